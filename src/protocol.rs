//! Protocol v1 between gateway and backend (see docs/protocol.md).
//!
//! Every message is multipart: frame 0 the kind (ASCII), frame 1 a UTF-8 JSON object.
//! Gateway → backend: `hello`, `reading`, `reply`, `stats`. Backend → gateway: `ack`, `command`.

use serde::Deserialize;
use serde_json::{json, Map, Value};

mod command;
pub use command::{
    check_write_value, command_id, parse_ack, parse_command, Action, Command, CommandError,
    StableDigest, MAX_ID_LEN,
};

/// The protocol version a gateway announces in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frame 0 of a `hello` (gateway → backend).
pub const KIND_HELLO: &str = "hello";
/// Frame 0 of a `reading` (gateway → backend).
pub const KIND_READING: &str = "reading";
/// Frame 0 of a `reply` (gateway → backend).
pub const KIND_REPLY: &str = "reply";
/// Frame 0 of a `stats` message (gateway → backend).
pub const KIND_STATS: &str = "stats";
/// Frame 0 of an `ack` (backend → gateway).
pub const KIND_ACK: &str = "ack";
/// Frame 0 of a `command` (backend → gateway).
pub const KIND_COMMAND: &str = "command";

/// Longest serial line accepted, in bytes (without the line ending).
pub const MAX_LINE: usize = 4096;

/// Largest `command` (and `ack`) body accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// Deepest nesting of JSON arrays/objects accepted in commands, acks and json serial lines
/// (serde_json's own limit is 128).
pub const MAX_JSON_DEPTH: usize = 8;

/// Longest `write` command value, in bytes (before the port's line ending).
pub const MAX_WRITE_BYTES: usize = 1024;

/// True when `json` nests arrays/objects deeper than `max`. A linear scan over the bytes that
/// skips string contents (with escapes); it does not validate the JSON.
pub fn json_depth_exceeds(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// How a serial line is turned into the `values` of a reading (`[[serial]] format`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    /// `key=value` pairs split by spaces or commas.
    #[default]
    Kv,
    /// One JSON object per line.
    Json,
    /// The whole line as `{"line": "..."}`.
    Raw,
}

/// A two-frame message: kind and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Frame 0, one of the `KIND_*` constants.
    pub kind: &'static str,
    /// Frame 1, the JSON object as text.
    pub body: String,
}

impl Message {
    /// A message of `kind` with `body` serialised.
    pub fn new(kind: &'static str, body: &Value) -> Message {
        Message {
            kind,
            body: body.to_string(),
        }
    }
    /// The two frames to send.
    pub fn frames(&self) -> [&[u8]; 2] {
        [self.kind.as_bytes(), self.body.as_bytes()]
    }
}

/// Why a serial line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Nothing but separators (kv) or whitespace (json).
    #[error("empty line")]
    Empty,
    /// The bytes are not UTF-8.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// A kv pair without `=`.
    #[error("kv pair {0:?} has no '=' (expected key=value)")]
    NoEquals(String),
    /// A kv pair with nothing before `=`.
    #[error("kv pair {0:?} has an empty key")]
    EmptyKey(String),
    /// A kv key given twice in one line.
    #[error("key {0:?} appears twice")]
    DuplicateKey(String),
    /// A json line that serde_json refuses; the text is its reason.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// A json line that is valid JSON but not an object.
    #[error("JSON line is not an object")]
    NotObject,
    /// A json line nested deeper than [`MAX_JSON_DEPTH`].
    #[error("JSON nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    /// A NUL byte (or, in a JSON line, a `\u0000` escape): many databases refuse it in text
    /// (PostgreSQL's jsonb does), so such a line is never sent.
    #[error("line contains a NUL character")]
    Nul,
}

/// The `values` object of a reading, already serialised as compact JSON text
/// (`{"temperature":21.5,"ok":true}`).
///
/// Readings are written straight to text: building a `serde_json::Value` tree (an ordered map
/// per line) and serialising it again would be the largest cost per reading on the loop thread
/// (docs/benchmarks.md, item 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values(String);

impl Values {
    /// The JSON object text.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// Parsed back into a JSON object (for tests and tools; not used per reading).
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::from_str(&self.0) {
            Ok(Value::Object(m)) => m,
            // Values are only ever built from a JSON object; see the constructors.
            _ => unreachable!("Values holds a JSON object"),
        }
    }

    /// `{"<key>":<value>}` with one entry.
    pub fn single(key: &str, value: &Value) -> Values {
        let mut out = String::with_capacity(key.len() + 16);
        out.push('{');
        push_json_str(&mut out, key);
        out.push(':');
        out.push_str(&value.to_string());
        out.push('}');
        Values(out)
    }

    /// `{"<key>":<value>, ...}` with the entries in the order given (keys must differ).
    pub fn pairs(entries: &[(&str, &Value)]) -> Values {
        let mut out = String::with_capacity(2 + entries.len() * 16);
        out.push('{');
        for (n, (key, value)) in entries.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            push_json_str(&mut out, key);
            out.push(':');
            out.push_str(&value.to_string());
        }
        out.push('}');
        Values(out)
    }
}

/// Appends `s` as a JSON string literal (quotes, escapes for `"`, `\\` and control
/// characters, exactly as serde_json writes them).
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Parses one serial line (without its line ending) into the `values` of a reading.
/// A line containing a NUL byte is refused ([`LineError::Nul`]) in every format.
pub fn parse_line(format: LineFormat, line: &[u8]) -> Result<Values, LineError> {
    if line.contains(&0) {
        return Err(LineError::Nul);
    }
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    match format {
        LineFormat::Kv => parse_kv(text),
        LineFormat::Json => parse_json_object(text),
        LineFormat::Raw => {
            let mut out = String::with_capacity(text.len() + 12);
            out.push_str("{\"line\":");
            push_json_str(&mut out, text);
            out.push('}');
            Ok(Values(out))
        }
    }
}

/// Above this many pairs, duplicate keys are found with a hash set instead of a scan.
const KV_SCAN_KEYS: usize = 16;

/// `temperature=21.5 humidity=40,ok=true`: pairs split by spaces or commas; numbers become
/// JSON numbers, `true`/`false` booleans, anything else strings.
pub fn parse_kv(text: &str) -> Result<Values, LineError> {
    let mut out = String::with_capacity(text.len() + 32);
    let mut keys: Vec<&str> = Vec::new();
    let mut seen: Option<std::collections::HashSet<&str>> = None;
    out.push('{');
    for pair in text
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| LineError::NoEquals(pair.to_string()))?;
        if k.is_empty() {
            return Err(LineError::EmptyKey(pair.to_string()));
        }
        let duplicate = match &mut seen {
            Some(set) => !set.insert(k),
            None if keys.len() < KV_SCAN_KEYS => keys.contains(&k),
            None => {
                let mut set: std::collections::HashSet<&str> = keys.drain(..).collect();
                let dup = !set.insert(k);
                seen = Some(set);
                dup
            }
        };
        if duplicate {
            return Err(LineError::DuplicateKey(k.to_string()));
        }
        if seen.is_none() {
            keys.push(k);
        }
        if out.len() > 1 {
            out.push(',');
        }
        push_json_str(&mut out, k);
        out.push(':');
        push_kv_value(&mut out, v);
    }
    if out.len() == 1 {
        return Err(LineError::Empty);
    }
    out.push('}');
    Ok(Values(out))
}

fn push_kv_value(out: &mut String, v: &str) {
    use std::fmt::Write;
    match v {
        "true" | "false" => return out.push_str(v),
        _ => {}
    }
    if let Ok(i) = v.parse::<i64>() {
        let _ = write!(out, "{i}");
        return;
    }
    // Only plain decimal notation counts as a number: "inf", "nan", "1e5x" stay strings.
    if v.bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && v.bytes().any(|b| b.is_ascii_digit())
    {
        if let Ok(f) = v.parse::<f64>() {
            if let Some(n) = serde_json::Number::from_f64(f) {
                let _ = write!(out, "{n}");
                return;
            }
        }
    }
    push_json_str(out, v)
}

fn parse_json_object(text: &str) -> Result<Values, LineError> {
    if text.trim().is_empty() {
        return Err(LineError::Empty);
    }
    if json_depth_exceeds(text.as_bytes(), MAX_JSON_DEPTH) {
        return Err(LineError::TooDeep);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) if has_nul(&v) => Err(LineError::Nul),
        Ok(v @ Value::Object(_)) => Ok(Values(v.to_string())),
        Ok(_) => Err(LineError::NotObject),
        Err(e) => Err(LineError::Json(e.to_string())),
    }
}

/// True when a key or string anywhere in `v` contains U+0000 (written `\u0000` in JSON).
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Current time as RFC 3339 UTC with milliseconds, e.g. `2026-11-28T01:02:03.456Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The body of a `reading` as a new string (see [`write_reading_body`]).
pub fn reading_body(gateway: &str, seq: u64, source: &str, time: &str, values: &Values) -> String {
    let mut out = String::new();
    write_reading_body(&mut out, gateway, seq, source, time, values);
    out
}

/// The fields a `reading` carries only sometimes (see [`write_reading_body_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadingExtra<'a> {
    /// Sent because `max_interval_s` passed, not because it changed: `"heartbeat": true`.
    pub heartbeat: bool,
    /// Made while the wall clock was not synchronised: `"clock": "unsynced"`, `"mono_ms"`
    /// (CLOCK_BOOTTIME ms when it was read) and `"boot_id"` (the boot that clock counts from).
    pub unsynced: Option<(u64, &'a str)>,
}

/// Writes the body of a `reading` into `out` (cleared first):
/// `{"gateway":…,"seq":…,"source":…,"time":…,"values":{…}}`.
pub fn write_reading_body(
    out: &mut String,
    gateway: &str,
    seq: u64,
    source: &str,
    time: &str,
    values: &Values,
) {
    write_reading_body_with(
        out,
        gateway,
        seq,
        source,
        time,
        values,
        ReadingExtra::default(),
    )
}

/// [`write_reading_body`] with the optional fields of `extra`, after `time`:
/// `…,"time":…[,"clock":"unsynced","mono_ms":…,"boot_id":…][,"heartbeat":true],"values":{…}}`.
pub fn write_reading_body_with(
    out: &mut String,
    gateway: &str,
    seq: u64,
    source: &str,
    time: &str,
    values: &Values,
    extra: ReadingExtra<'_>,
) {
    use std::fmt::Write;
    out.clear();
    out.reserve(64 + gateway.len() + source.len() + time.len() + values.0.len());
    out.push_str("{\"gateway\":");
    push_json_str(out, gateway);
    let _ = write!(out, ",\"seq\":{seq},\"source\":");
    push_json_str(out, source);
    out.push_str(",\"time\":");
    push_json_str(out, time);
    if let Some((mono_ms, boot_id)) = extra.unsynced {
        let _ = write!(
            out,
            ",\"clock\":\"unsynced\",\"mono_ms\":{mono_ms},\"boot_id\":"
        );
        push_json_str(out, boot_id);
    }
    if extra.heartbeat {
        out.push_str(",\"heartbeat\":true");
    }
    out.push_str(",\"values\":");
    out.push_str(&values.0);
    out.push('}');
}

/// The `seq` of a reading body as written by [`write_reading_body`]
/// (`{"gateway":"…","seq":N,…}`), without parsing the whole object; `None` if the body has
/// none. Every `"` inside the gateway id is escaped (`\"`), so the first `,"seq":` is the
/// field itself.
pub fn reading_seq(body: &str) -> Option<u64> {
    const KEY: &str = ",\"seq\":";
    if let Some(at) = body.find(KEY) {
        let digits = &body[at + KEY.len()..];
        let end = digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len());
        if let Ok(seq) = digits[..end].parse() {
            return Some(seq);
        }
    }
    // Not in the writer's layout (a reading from another writer): parse it.
    serde_json::from_str::<Value>(body)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// A `reply` saying the command `id` took effect.
pub fn reply_ok(id: &str) -> Message {
    Message::new(KIND_REPLY, &json!({"id": id, "ok": true}))
}

/// A `reply` refusing the command `id`, with the reason.
pub fn reply_err(id: &str, error: &str) -> Message {
    Message::new(KIND_REPLY, &json!({"id": id, "ok": false, "error": error}))
}

#[cfg(test)]
mod tests;
