//! Where in the config text a key is: turns byte offsets and (section, table index, key)
//! into the 1-based line and dotted key that every [`ConfigError`] names.

use super::ConfigError;

fn line_of_offset(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Turns a toml/serde error into a ConfigError with line and dotted key.
pub(super) fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let (mut line, mut key) = match e.span() {
        Some(span) => {
            let line = line_of_offset(text, span.start);
            (line, key_at_line(text, line))
        }
        None => (0, String::new()),
    };
    // A table with flattened keys (the report keys) reports an unknown key with the span of
    // the whole table: find the key's own line in it.
    let mut message = message;
    if let Some(name) = backticked(&message).filter(|_| message.starts_with("unknown field")) {
        if let Some(at) = key_line_in_table(text, line, name) {
            line = at;
            key = key_at_line(text, at);
        }
    } else if let Some((name, rest)) = message.split_once(": ").filter(|_| {
        text.lines()
            .nth(line.wrapping_sub(1))
            .is_some_and(|l| header_name(l).is_some())
    }) {
        // A flattened key's own error starts with `<key>: ` (see `ReportConfig`), and its span
        // is the whole table's.
        if let Some(at) = key_line_in_table(text, line, name) {
            line = at;
            key = key_at_line(text, at);
            message = rest.to_string();
        }
    }
    // serde names the offending key in the message for unknown/missing fields.
    let key = match backticked(&message) {
        Some(name)
            if message.starts_with("unknown field") || message.starts_with("missing field") =>
        {
            let section = section_at_line(text, line);
            if key.is_empty() || message.starts_with("missing field") {
                join_key(&section, name)
            } else {
                key
            }
        }
        _ => key,
    };
    ConfigError {
        file: file.to_string(),
        line,
        key,
        message,
    }
}

fn backticked(s: &str) -> Option<&str> {
    let start = s.find('`')? + 1;
    let end = s[start..].find('`')? + start;
    Some(&s[start..end])
}

fn join_key(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

fn header_name(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t
        .strip_prefix("[[")
        .and_then(|r| r.split("]]").next())
        .or_else(|| t.strip_prefix('[').and_then(|r| r.split(']').next()))?;
    Some(inner.trim().to_string())
}

/// The line (1-based) setting `name` in the table that `line` starts or is in, scanning from
/// `line` to the next table header.
fn key_line_in_table(text: &str, line: usize, name: &str) -> Option<usize> {
    for (i, l) in text.lines().enumerate().skip(line.checked_sub(1)?) {
        if header_name(l).is_some() {
            if i + 1 == line {
                continue;
            }
            return None;
        }
        if let Some((k, _)) = l.split_once('=') {
            if k.trim().trim_matches('"') == name {
                return Some(i + 1);
            }
        }
    }
    None
}

/// The table header in force at `line` (1-based), "" for the root table.
fn section_at_line(text: &str, line: usize) -> String {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate() {
        if i + 1 > line {
            break;
        }
        if let Some(h) = header_name(l) {
            section = h;
        }
    }
    section
}

/// The dotted key defined on `line` (1-based), or the section if the line is a header.
fn key_at_line(text: &str, line: usize) -> String {
    let section = section_at_line(text, line);
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return section;
    };
    if header_name(l).is_some() {
        return section;
    }
    match l.split_once('=') {
        Some((k, _)) => join_key(&section, k.trim().trim_matches('"')),
        None => section,
    }
}

/// Line (1-based) where `key` is set in the `index`-th `[section]`/`[[section]]`;
/// the header's line when the key is absent, 0 when the section is absent.
pub(super) fn locate(text: &str, section: &str, index: Option<usize>, key: &str) -> usize {
    let want = index.unwrap_or(0);
    let mut seen: Option<usize> = None;
    let mut in_target = false;
    let mut header_line = 0;
    for (i, l) in text.lines().enumerate() {
        if let Some(h) = header_name(l) {
            if h == section {
                seen = Some(seen.map_or(0, |n| n + 1));
                in_target = seen == Some(want);
                if in_target {
                    header_line = i + 1;
                }
            } else {
                in_target = false;
            }
            continue;
        }
        if in_target {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return i + 1;
                }
            }
        }
    }
    header_line
}
