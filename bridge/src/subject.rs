//! Gateway ids and source names as NATS subject tokens (and key-value keys).
//!
//! A token keeps `A-Z a-z 0-9 _ -` as they are; every other byte (of the UTF-8 text) becomes
//! `=XX`, two uppercase hex digits, `=` itself included: `gw.01` → `gw=2E01`,
//! `rain gauge` → `rain=20gauge`, `a=b` → `a=3Db`. The escape is reversible ([`untoken`]), so
//! no two names share a token and a consumer gets the name back; the body of every message
//! holds the name unescaped anyway. The characters kept are the ones valid both in a subject
//! token and in a key of a key-value bucket, so the same token is the bucket key.

use std::fmt::Write as _;

/// The subject token of a gateway id or source name (see the module documentation).
pub fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    push_token(&mut out, name);
    out
}

/// Appends the subject token of `name` to `out`.
fn push_token(out: &mut String, name: &str) {
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    if name.is_empty() {
        // An empty token would make an invalid subject ("a..b"); "=" alone is never produced
        // by a non-empty name.
        out.push('=');
    }
}

/// The name a token stands for; `None` when `token` is not one [`token`] produces.
#[cfg(test)]
pub fn untoken(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    let b = token.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `zgate.<gateway>.reading.<source>`.
#[cfg(test)]
pub fn reading_subject(gateway: &str, source: &str) -> String {
    with_source(&reading_prefix(gateway), source)
}

/// `zgate.<gateway>.reading.`: a gateway's reading subjects without the source token.
pub fn reading_prefix(gateway: &str) -> String {
    format!("zgate.{}.reading.", token(gateway))
}

/// A reading subject: a gateway's [`reading_prefix`] followed by the source's token.
pub fn with_source(prefix: &str, source: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + source.len());
    s.push_str(prefix);
    push_token(&mut s, source);
    s
}

/// `zgate.<gateway>.<kind>` (`hello`, `stats`, `command`).
pub fn gateway_subject(gateway: &str, kind: &str) -> String {
    format!("zgate.{}.{kind}", token(gateway))
}

/// The `Nats-Msg-Id` of a reading: `<gateway token>:<spool_id>:<seq>`.
pub fn msg_id(gateway: &str, spool_id: &str, seq: u64) -> String {
    format!("{}:{spool_id}:{seq}", token(gateway))
}

/// The subjects the stream captures.
pub const STREAM_SUBJECTS: [&str; 3] = ["zgate.*.reading.>", "zgate.*.hello", "zgate.*.stats"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_their_own_token() {
        assert_eq!(token("gw-01"), "gw-01");
        assert_eq!(token("Temp_1"), "Temp_1");
        assert_eq!(
            reading_subject("gw-01", "weather"),
            "zgate.gw-01.reading.weather"
        );
    }

    #[test]
    fn subject_breaking_characters_are_escaped_reversibly() {
        for (name, tok) in [
            ("gw.01", "gw=2E01"),
            ("a*b", "a=2Ab"),
            ("x>", "x=3E"),
            ("rain gauge", "rain=20gauge"),
            ("tab\there", "tab=09here"),
            ("a=b", "a=3Db"),
            ("=2E", "=3D2E"),
            ("café", "caf=C3=A9"),
            ("", "="),
        ] {
            assert_eq!(token(name), tok, "{name:?}");
            assert_eq!(untoken(tok).as_deref(), Some(name), "{tok}");
            assert!(tok
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_-=".contains(&c)));
        }
        // Distinct names never share a token.
        assert_ne!(token("a.b"), token("a=2Eb"));
        assert_eq!(msg_id("g.1", "ab", 7), "g=2E1:ab:7");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert_eq!(untoken("a=2"), None);
        assert_eq!(untoken("a=ZZ"), None);
        assert_eq!(untoken("=FF"), None);
    }
}
