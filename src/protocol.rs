//! Protocol v1 between gateway and backend (see docs/protocol.md).
//!
//! Every message is multipart: frame 0 the kind (ASCII), frame 1 a UTF-8 JSON object.
//! Gateway → backend: `hello`, `reading`, `reply`, `stats`. Backend → gateway: `ack`, `command`.

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::fmt;

pub const PROTOCOL_VERSION: u32 = 1;

pub const KIND_HELLO: &str = "hello";
pub const KIND_READING: &str = "reading";
pub const KIND_REPLY: &str = "reply";
pub const KIND_STATS: &str = "stats";
pub const KIND_ACK: &str = "ack";
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

/// The string `id` of a JSON object, without building the rest of it (other values are
/// skipped without being converted, so a number out of range for JSON numbers does not hide
/// the id; serde_json bounds the recursion). `None` when there is no usable string id, or
/// when the object has two `id` keys with different values. Used to answer a refused command.
pub fn command_id(body: &[u8]) -> Option<String> {
    match TopLevel::scan(body).ok()?.id() {
        IdLookup::Found(id) => Some(id),
        _ => None,
    }
}

/// One value of an `id` key, as far as the top-level scan needs it.
#[derive(Debug, Clone, PartialEq)]
enum IdValue {
    Str(String),
    /// A number, boolean, null, array or object (never a usable id).
    NotString,
}

impl<'de> Deserialize<'de> for IdValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IdValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IdValue, E> {
                Ok(IdValue::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<IdValue, E> {
                Ok(IdValue::Str(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<IdValue, E> {
                Ok(IdValue::NotString)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<IdValue, E> {
                Ok(IdValue::NotString)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<IdValue, E> {
                Ok(IdValue::NotString)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<IdValue, E> {
                Ok(IdValue::NotString)
            }
            fn visit_unit<E: de::Error>(self) -> Result<IdValue, E> {
                Ok(IdValue::NotString)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<IdValue, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IdValue::NotString)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<IdValue, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IdValue::NotString)
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys of a JSON object and the values of its `id` keys; every other value is skipped
/// unconverted (serde's `IgnoredAny`), so `1e400` or a 5,000-digit integer elsewhere does
/// not stop the scan.
#[derive(Debug, Default)]
struct TopLevel {
    ids: Vec<IdValue>,
    /// Keys that appear more than once, in order of their second appearance.
    duplicates: Vec<String>,
}

/// The outcome of looking for a command's `id`.
#[derive(Debug, PartialEq)]
enum IdLookup {
    Found(String),
    Missing,
    /// Present but not a string of 1 to MAX_ID_LEN characters; the text says why.
    Unusable(String),
    /// Two or more `id` keys with different values: no id can be trusted.
    Ambiguous,
}

impl TopLevel {
    fn scan(body: &[u8]) -> Result<TopLevel, serde_json::Error> {
        serde_json::from_slice(body)
    }

    fn id(&self) -> IdLookup {
        let Some(first) = self.ids.first() else {
            return IdLookup::Missing;
        };
        if self.ids.iter().any(|v| v != first) {
            return IdLookup::Ambiguous;
        }
        match first {
            IdValue::Str(s) if !s.is_empty() && s.len() <= MAX_ID_LEN => IdLookup::Found(s.clone()),
            IdValue::Str(_) => {
                IdLookup::Unusable(format!("\"id\" must be 1 to {MAX_ID_LEN} characters"))
            }
            IdValue::NotString => IdLookup::Unusable("\"id\" must be a string".into()),
        }
    }
}

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<TopLevel, A::Error> {
                let mut top = TopLevel::default();
                let mut seen: HashSet<String> = HashSet::new();
                while let Some(key) = a.next_key::<String>()? {
                    if key == "id" {
                        top.ids.push(a.next_value::<IdValue>()?);
                    } else {
                        a.next_value::<IgnoredAny>()?;
                    }
                    if !seen.insert(key.clone()) && !top.duplicates.contains(&key) {
                        top.duplicates.push(key);
                    }
                }
                Ok(top)
            }
        }
        d.deserialize_map(V)
    }
}

/// The first key that appears twice in one object, at any depth, of a JSON text that
/// serde_json already parsed (so every number in it is in range).
fn nested_duplicate_key(body: &[u8]) -> Option<String> {
    struct Check(Option<String>);
    impl<'de> Deserialize<'de> for Check {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Check;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_bool<E: de::Error>(self, _: bool) -> Result<Check, E> {
                    Ok(Check(None))
                }
                fn visit_i64<E: de::Error>(self, _: i64) -> Result<Check, E> {
                    Ok(Check(None))
                }
                fn visit_u64<E: de::Error>(self, _: u64) -> Result<Check, E> {
                    Ok(Check(None))
                }
                fn visit_f64<E: de::Error>(self, _: f64) -> Result<Check, E> {
                    Ok(Check(None))
                }
                fn visit_str<E: de::Error>(self, _: &str) -> Result<Check, E> {
                    Ok(Check(None))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Check, E> {
                    Ok(Check(None))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Check, A::Error> {
                    let mut found = None;
                    while let Some(Check(inner)) = a.next_element::<Check>()? {
                        found = found.or(inner);
                    }
                    Ok(Check(found))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Check, A::Error> {
                    let mut found = None;
                    let mut seen: HashSet<String> = HashSet::new();
                    while let Some(key) = a.next_key::<String>()? {
                        let Check(inner) = a.next_value::<Check>()?;
                        if found.is_none() && !seen.insert(key.clone()) {
                            found = Some(key);
                        }
                        found = found.or(inner);
                    }
                    Ok(Check(found))
                }
            }
            d.deserialize_any(V)
        }
    }
    serde_json::from_slice::<Check>(body).ok()?.0
}

/// Checks a serial `write` value: at most [`MAX_WRITE_BYTES`], and no control characters
/// unless the port sets `allow_binary`.
pub fn check_write_value(text: &str, allow_binary: bool) -> Result<(), String> {
    if text.len() > MAX_WRITE_BYTES {
        return Err(format!(
            "write: value is {} bytes, the limit is {MAX_WRITE_BYTES}",
            text.len()
        ));
    }
    if !allow_binary {
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(format!(
                "write: control character {:?} refused (set allow_binary = true on the port to \
                 allow it)",
                c
            ));
        }
    }
    Ok(())
}

/// A two-frame message: kind and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: &'static str,
    pub body: String,
}

impl Message {
    pub fn new(kind: &'static str, body: &Value) -> Message {
        Message {
            kind,
            body: body.to_string(),
        }
    }
    pub fn frames(&self) -> [&[u8]; 2] {
        [self.kind.as_bytes(), self.body.as_bytes()]
    }
}

/// Why a serial line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("empty line")]
    Empty,
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("kv pair {0:?} has no '=' (expected key=value)")]
    NoEquals(String),
    #[error("kv pair {0:?} has an empty key")]
    EmptyKey(String),
    #[error("key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("JSON line is not an object")]
    NotObject,
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
/// per line) and serialising it again was the largest cost per reading on the loop thread
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

pub fn reading_body(gateway: &str, seq: u64, source: &str, time: &str, values: &Values) -> String {
    let mut out = String::new();
    write_reading_body(&mut out, gateway, seq, source, time, values);
    out
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
    use std::fmt::Write;
    out.clear();
    out.reserve(64 + gateway.len() + source.len() + time.len() + values.0.len());
    out.push_str("{\"gateway\":");
    push_json_str(out, gateway);
    let _ = write!(out, ",\"seq\":{seq},\"source\":");
    push_json_str(out, source);
    out.push_str(",\"time\":");
    push_json_str(out, time);
    out.push_str(",\"values\":");
    out.push_str(&values.0);
    out.push('}');
}

pub fn reply_ok(id: &str) -> Message {
    Message::new(KIND_REPLY, &json!({"id": id, "ok": true}))
}

pub fn reply_err(id: &str, error: &str) -> Message {
    Message::new(KIND_REPLY, &json!({"id": id, "ok": false, "error": error}))
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Drive an output to 0 or 1.
    Set(u8),
    /// Invert an output.
    Toggle,
    /// Invert an output for `ms` milliseconds, then restore the previous level.
    Pulse(u64),
    /// Write a string (plus the port's line ending) to a serial port.
    Write(String),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Set(_) => "set",
            Action::Toggle => "toggle",
            Action::Pulse(_) => "pulse",
            Action::Write(_) => "write",
        }
    }
}

/// A parsed `command` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: String,
    pub target: String,
    pub action: Action,
}

impl Command {
    /// A digest of what the command does: its target and its parsed action (so `"value": 1`
    /// and `"value": true` of a `set` are the same command); the id is not part of it. Two
    /// commands with equal digests do the same thing. Stable within one process run only
    /// (std's SipHash with fixed keys, whose algorithm may change between Rust releases):
    /// keep it in memory, never on disk or on the wire.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        // Length-prefixed fields: ("ab", "c") and ("a", "bc") hash differently.
        h.write_usize(self.target.len());
        h.write(self.target.as_bytes());
        h.write(self.action.name().as_bytes());
        match &self.action {
            Action::Set(level) => level.hash(&mut h),
            Action::Toggle => {}
            Action::Pulse(ms) => ms.hash(&mut h),
            Action::Write(text) => {
                h.write_usize(text.len());
                h.write(text.as_bytes());
            }
        }
        h.finish()
    }
}

/// A command that could not be parsed; `id` is known when the JSON had a string id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub id: Option<String>,
    pub message: String,
}

/// Longest command id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Parses the JSON body of a `command` message. Checks syntax and value types only; whether
/// the target exists and accepts the action is decided by the gateway.
///
/// Whenever the body is a JSON object with one usable string `id`, the error carries that id
/// (so the command is answered), even when another value cannot be read (a number out of
/// range for JSON numbers such as `1e400`). A key that appears twice in one object, at any
/// depth, makes the command bad: it is answered under its `id` when every `id` key holds the
/// same value; when two `id` keys differ there is no id to answer under (`id: None`).
pub fn parse_command(body: &[u8]) -> Result<Command, CommandError> {
    let bad = |id: Option<String>, message: String| CommandError { id, message };
    if body.len() > MAX_COMMAND_BYTES {
        return Err(bad(
            command_id(body),
            format!(
                "command is {} bytes, the limit is {MAX_COMMAND_BYTES}",
                body.len()
            ),
        ));
    }
    if json_depth_exceeds(body, MAX_JSON_DEPTH) {
        return Err(bad(
            command_id(body),
            format!("command JSON nests deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    let top = match TopLevel::scan(body) {
        Ok(top) => top,
        Err(e) if e.is_data() => return Err(bad(None, "command must be a JSON object".into())),
        Err(e) => return Err(bad(None, format!("malformed JSON: {e}"))),
    };
    let id = match top.id() {
        IdLookup::Found(id) => id,
        IdLookup::Missing => return Err(bad(None, "missing \"id\"".into())),
        IdLookup::Unusable(why) => return Err(bad(None, why)),
        IdLookup::Ambiguous => {
            return Err(bad(
                None,
                "duplicate key \"id\" with different values: no id to answer under".into(),
            ))
        }
    };
    if let Some(key) = top.duplicates.first() {
        return Err(bad(
            Some(id),
            format!("duplicate key {key:?} (each key may appear once)"),
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        // The scan above read the whole text, so what fails here is a value serde_json
        // cannot represent (a number beyond f64, such as 1e400).
        bad(Some(id.clone()), format!("unreadable value: {e}"))
    })?;
    let Value::Object(obj) = v else {
        return Err(bad(Some(id), "command must be a JSON object".into()));
    };
    if let Some(key) = nested_duplicate_key(body) {
        return Err(bad(
            Some(id),
            format!("duplicate key {key:?} in a nested object (each key may appear once)"),
        ));
    }
    let target = match obj.get("target") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad(Some(id), "\"target\" must be a string".into())),
        None => return Err(bad(Some(id), "missing \"target\"".into())),
    };
    let action = match obj.get("action") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(bad(Some(id), "\"action\" must be a string".into())),
        None => return Err(bad(Some(id), "missing \"action\"".into())),
    };
    for key in obj.keys() {
        if !matches!(key.as_str(), "id" | "target" | "action" | "value") {
            return Err(bad(Some(id), format!("unknown field {key:?}")));
        }
    }
    let value = obj.get("value");
    let action = match action {
        "set" => match value {
            Some(Value::Bool(b)) => Action::Set(u8::from(*b)),
            Some(Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                Action::Set(n.as_u64().unwrap_or(0) as u8)
            }
            Some(other) => {
                return Err(bad(
                    Some(id),
                    format!("set: value must be 0, 1, false or true, got {other}"),
                ))
            }
            None => return Err(bad(Some(id), "set: missing \"value\"".into())),
        },
        "toggle" => match value {
            None | Some(Value::Null) => Action::Toggle,
            Some(other) => {
                return Err(bad(Some(id), format!("toggle takes no value, got {other}")))
            }
        },
        "pulse" => {
            let ms = value
                .and_then(|v| v.as_object())
                .and_then(|o| o.get("ms"))
                .and_then(|ms| ms.as_u64());
            match ms {
                Some(ms) if ms > 0 => Action::Pulse(ms),
                _ => {
                    return Err(bad(
                        Some(id),
                        "pulse: value must be {\"ms\": N} with N a positive integer".into(),
                    ))
                }
            }
        }
        "write" => match value {
            Some(Value::String(s)) => Action::Write(s.clone()),
            _ => return Err(bad(Some(id), "write: value must be a string".into())),
        },
        other => {
            return Err(bad(
                Some(id),
                format!("unknown action {other:?} (set, toggle, pulse, write)"),
            ))
        }
    };
    Ok(Command { id, target, action })
}

/// Parses the JSON body of an `ack` message: `{"seq": N}`.
pub fn parse_ack(body: &[u8]) -> Result<u64, String> {
    #[derive(serde::Deserialize)]
    struct Ack {
        seq: u64,
    }
    if body.len() > MAX_COMMAND_BYTES || json_depth_exceeds(body, MAX_JSON_DEPTH) {
        return Err("ack too large or too deeply nested".into());
    }
    // Typed: no JSON tree is built for the message that arrives once per reading.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("ack must be {\"seq\": N} with N a non-negative integer".into());
    }
    match serde_json::from_slice::<Ack>(body) {
        Ok(a) => Ok(a.seq),
        Err(e) if e.is_data() => {
            Err("ack must be {\"seq\": N} with N a non-negative integer".into())
        }
        Err(e) => Err(format!("malformed JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_types() {
        let m =
            parse_kv("temperature=21.5 humidity=40,ok=true flag=false name=abc neg=-3").unwrap();
        assert_eq!(
            Value::Object(m.to_map()),
            json!({"temperature": 21.5, "humidity": 40, "ok": true, "flag": false, "name": "abc", "neg": -3})
        );
    }

    #[test]
    fn kv_edge_cases() {
        assert_eq!(parse_kv("  ,, "), Err(LineError::Empty));
        assert!(matches!(parse_kv("a=1 b"), Err(LineError::NoEquals(_))));
        assert!(matches!(parse_kv("=1"), Err(LineError::EmptyKey(_))));
        assert!(matches!(
            parse_kv("a=1 a=2"),
            Err(LineError::DuplicateKey(_))
        ));
        let m = parse_kv("a= b=nan c=inf d=1e3 e=x=y").unwrap();
        assert_eq!(
            m.as_json(),
            r#"{"a":"","b":"nan","c":"inf","d":1000.0,"e":"x=y"}"#
        );
        assert_eq!(
            Value::Object(m.to_map()),
            json!({"a": "", "b": "nan", "c": "inf", "d": 1000.0, "e": "x=y"})
        );
    }

    #[test]
    fn json_and_raw_lines() {
        let m = parse_line(LineFormat::Json, br#"{"t": 1, "s": "x"}"#).unwrap();
        assert_eq!(m.as_json(), r#"{"t":1,"s":"x"}"#);
        assert_eq!(
            parse_line(LineFormat::Json, b"[1,2]"),
            Err(LineError::NotObject)
        );
        assert!(matches!(
            parse_line(LineFormat::Json, b"{oops"),
            Err(LineError::Json(_))
        ));
        let m = parse_line(LineFormat::Raw, b"hello \"world\"\t\x01").unwrap();
        assert_eq!(
            Value::Object(m.to_map()),
            json!({"line": "hello \"world\"\t\u{1}"})
        );
        assert_eq!(
            parse_line(LineFormat::Raw, b"\xff\xfe"),
            Err(LineError::NotUtf8)
        );
    }

    #[test]
    fn commands_parse() {
        let c =
            parse_command(br#"{"id":"c-1","target":"relay1","action":"set","value":1}"#).unwrap();
        assert_eq!(c.action, Action::Set(1));
        let c = parse_command(br#"{"id":"c-1","target":"relay1","action":"set","value":false}"#)
            .unwrap();
        assert_eq!(c.action, Action::Set(0));
        let c = parse_command(br#"{"id":"c","target":"r","action":"toggle"}"#).unwrap();
        assert_eq!(c.action, Action::Toggle);
        let c = parse_command(br#"{"id":"c","target":"r","action":"pulse","value":{"ms":250}}"#)
            .unwrap();
        assert_eq!(c.action, Action::Pulse(250));
        let c = parse_command(br#"{"id":"c","target":"w","action":"write","value":"GO"}"#).unwrap();
        assert_eq!(c.action, Action::Write("GO".into()));
    }

    #[test]
    fn bad_commands_are_refused_with_id_when_known() {
        for (body, has_id) in [
            (&b"{nope"[..], false),
            (br#"[1]"#, false),
            (br#"{"target":"r","action":"set","value":1}"#, false),
            (br#"{"id":5,"target":"r","action":"set","value":1}"#, false),
            (br#"{"id":"c","action":"set","value":1}"#, true),
            (br#"{"id":"c","target":"r","action":"fly"}"#, true),
            (br#"{"id":"c","target":"r","action":"set","value":2}"#, true),
            (
                br#"{"id":"c","target":"r","action":"set","value":"1"}"#,
                true,
            ),
            (br#"{"id":"c","target":"r","action":"set"}"#, true),
            (
                br#"{"id":"c","target":"r","action":"toggle","value":1}"#,
                true,
            ),
            (
                br#"{"id":"c","target":"r","action":"pulse","value":5}"#,
                true,
            ),
            (
                br#"{"id":"c","target":"r","action":"pulse","value":{"ms":0}}"#,
                true,
            ),
            (
                br#"{"id":"c","target":"r","action":"pulse","value":{"ms":-5}}"#,
                true,
            ),
            (
                br#"{"id":"c","target":"r","action":"write","value":7}"#,
                true,
            ),
            (
                br#"{"id":"c","target":"r","action":"set","value":1,"x":1}"#,
                true,
            ),
        ] {
            let e = parse_command(body).unwrap_err();
            assert_eq!(e.id.is_some(), has_id, "{}", String::from_utf8_lossy(body));
            assert!(!e.message.is_empty());
        }
    }

    /// A value serde_json cannot represent no longer hides the id: the command is answered.
    #[test]
    fn unreadable_values_are_answered_under_their_id() {
        let huge = "9".repeat(5000);
        for value in [
            "1e400",
            "-1e400",
            huge.as_str(),
            "{\"ms\":1e400}",
            "[1, 2e999]",
        ] {
            for action in ["set", "pulse", "write"] {
                let body =
                    format!(r#"{{"id":"c-7","target":"r","action":"{action}","value":{value}}}"#);
                let e = parse_command(body.as_bytes()).unwrap_err();
                assert_eq!(e.id.as_deref(), Some("c-7"), "{body}");
                assert!(e.message.contains("out of range"), "{}", e.message);
                assert_eq!(command_id(body.as_bytes()).as_deref(), Some("c-7"));
            }
        }
        // The id may come after the unreadable value.
        let e = parse_command(br#"{"value":1e400,"target":"r","action":"set","id":"c-8"}"#)
            .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c-8"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        // Two different ids: no id can be trusted, nothing to answer under.
        let e =
            parse_command(br#"{"id":"a","target":"r","action":"toggle","id":"b"}"#).unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.message.contains("different values"), "{}", e.message);
        assert_eq!(command_id(br#"{"id":"a","id":"b"}"#), None);
        let e = parse_command(br#"{"id":"a","target":"r","action":"toggle","id":5}"#).unwrap_err();
        assert_eq!(e.id, None);
        // The same id twice: refused, answered under it.
        let e =
            parse_command(br#"{"id":"a","target":"r","action":"toggle","id":"a"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("a"));
        assert!(e.message.contains("duplicate key \"id\""), "{}", e.message);
        // Any other key twice (the last one used to win).
        for body in [
            &br#"{"id":"c","target":"r","action":"set","value":0,"value":1}"#[..],
            br#"{"id":"c","target":"r","target":"q","action":"toggle"}"#,
            br#"{"id":"c","target":"r","action":"set","action":"toggle"}"#,
        ] {
            let e = parse_command(body).unwrap_err();
            assert_eq!(e.id.as_deref(), Some("c"));
            assert!(e.message.starts_with("duplicate key"), "{}", e.message);
        }
        // Inside value too.
        let e = parse_command(
            br#"{"id":"c","target":"r","action":"pulse","value":{"ms":10,"ms":99999}}"#,
        )
        .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c"));
        assert!(e.message.contains("nested"), "{}", e.message);
        // Equal keys in different objects are fine.
        let c = parse_command(br#"{"id":"c","target":"r","action":"pulse","value":{"ms":10}}"#)
            .unwrap();
        assert_eq!(c.action, Action::Pulse(10));
    }

    #[test]
    fn digest_is_over_target_and_action() {
        let d = |body: &str| parse_command(body.as_bytes()).unwrap().digest();
        let set1 = d(r#"{"id":"a","target":"r","action":"set","value":1}"#);
        assert_eq!(
            set1,
            d(r#"{"action":"set","value":true,"target":"r","id":"b"}"#),
            "same command under another id, other key order and spelling"
        );
        let others = [
            d(r#"{"id":"a","target":"r","action":"set","value":0}"#),
            d(r#"{"id":"a","target":"q","action":"set","value":1}"#),
            d(r#"{"id":"a","target":"r","action":"toggle"}"#),
            d(r#"{"id":"a","target":"r","action":"pulse","value":{"ms":1}}"#),
            d(r#"{"id":"a","target":"r","action":"pulse","value":{"ms":2}}"#),
            d(r#"{"id":"a","target":"r","action":"write","value":"1"}"#),
            d(r#"{"id":"a","target":"r","action":"write","value":"RESET"}"#),
            d(r#"{"id":"a","target":"rw","action":"write","value":"x"}"#),
            d(r#"{"id":"a","target":"r","action":"write","value":"wx"}"#),
        ];
        let mut all: Vec<u64> = others.to_vec();
        all.push(set1);
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            others.len() + 1,
            "every command has its own digest"
        );
    }

    #[test]
    fn nul_lines_are_bad_in_every_format() {
        for (format, line) in [
            (LineFormat::Kv, &b"a=1\0 b=2"[..]),
            (LineFormat::Kv, b"a\0=1"),
            (LineFormat::Raw, b"abc\0"),
            (LineFormat::Json, b"{\"a\":1}\0"),
            (LineFormat::Json, br#"{"a":"x\u0000"}"#),
            (LineFormat::Json, br#"{"a\u0000":1}"#),
            (LineFormat::Json, br#"{"a":[{"b":"\u0000"}]}"#),
        ] {
            assert_eq!(
                parse_line(format, line),
                Err(LineError::Nul),
                "{format:?} {line:?}"
            );
        }
        // An escaped backslash followed by "u0000" is not a NUL.
        assert!(parse_line(LineFormat::Json, br#"{"a":"\\u0000"}"#).is_ok());
    }

    #[test]
    fn json_depth_scan() {
        assert!(!json_depth_exceeds(b"{}", 1));
        assert!(json_depth_exceeds(b"{\"a\":[]}", 1));
        assert!(!json_depth_exceeds(b"{\"a\":[]}", 2));
        // Brackets inside strings, with escaped quotes, do not count.
        assert!(!json_depth_exceeds(br#"{"a":"[[[[\"[[[["}"#, 1));
        assert!(json_depth_exceeds(br#"{"a":"\\"}[[[ "#, 2));
        let deep = format!("{}{}", "[".repeat(9), "]".repeat(9));
        assert!(json_depth_exceeds(deep.as_bytes(), MAX_JSON_DEPTH));
        let ok = format!("{}{}", "[".repeat(8), "]".repeat(8));
        assert!(!json_depth_exceeds(ok.as_bytes(), MAX_JSON_DEPTH));
        // Unbalanced closers never underflow.
        assert!(!json_depth_exceeds(b"]]]]}}{", 1));
    }

    #[test]
    fn command_limits() {
        let deep = format!(
            r#"{{"id":"c-9","target":"r","action":"set","value":{}1{}}}"#,
            "[".repeat(20),
            "]".repeat(20)
        );
        let e = parse_command(deep.as_bytes()).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c-9"));
        assert!(e.message.contains("deeper"), "{}", e.message);
        let big = format!(
            r#"{{"id":"c-8","target":"r","action":"write","value":"{}"}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        let e = parse_command(big.as_bytes()).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c-8"));
        assert!(e.message.contains("limit"), "{}", e.message);
        // Way past serde_json's recursion limit: refused by the scan, no id, no crash.
        let abyss = "[".repeat(100_000);
        assert_eq!(parse_command(abyss.as_bytes()).unwrap_err().id, None);
        assert_eq!(
            command_id(br#"{"id":"x","v":[[[1]]]}"#).as_deref(),
            Some("x")
        );
        assert_eq!(command_id(br#"{"id":5}"#), None);
        let deep_line = format!("{{\"a\":{}{}}}", "[".repeat(9), "]".repeat(9));
        assert_eq!(
            parse_line(LineFormat::Json, deep_line.as_bytes()),
            Err(LineError::TooDeep)
        );
        assert!(parse_ack(abyss.as_bytes()).is_err());
    }

    #[test]
    fn write_values() {
        assert!(check_write_value("GO 12.5", false).is_ok());
        assert!(check_write_value("\x1b[2J", false)
            .unwrap_err()
            .contains("allow_binary"));
        assert!(check_write_value("a\tb", false).is_err());
        assert!(check_write_value("a\u{7f}", false).is_err());
        assert!(check_write_value("a\u{85}", false).is_err());
        assert!(check_write_value("\x1b[2J", true).is_ok());
        assert!(check_write_value(&"x".repeat(MAX_WRITE_BYTES), false).is_ok());
        assert!(check_write_value(&"x".repeat(MAX_WRITE_BYTES + 1), true).is_err());
    }

    #[test]
    fn acks() {
        assert_eq!(parse_ack(br#"{"seq": 42}"#), Ok(42));
        assert_eq!(parse_ack(br#" {"other": [1], "seq": 7}"#), Ok(7));
        let must = Err("ack must be {\"seq\": N} with N a non-negative integer".to_string());
        assert_eq!(parse_ack(br#"{"seq": -1}"#), must);
        assert_eq!(parse_ack(br#"{"seq": 1.5}"#), must);
        assert_eq!(parse_ack(br#"{"n": 1}"#), must);
        assert_eq!(parse_ack(b"[42]"), must);
        assert!(parse_ack(b"{").unwrap_err().starts_with("malformed JSON"));
    }

    /// The hand-written JSON text is what serde_json would write, for every ASCII byte,
    /// multi-byte characters and escapes.
    #[test]
    fn json_text_matches_serde_json() {
        let mut strings: Vec<String> = (0u8..128).map(|b| format!("a{}b", b as char)).collect();
        strings.extend(
            [
                "",
                "\\\"",
                "température=21.5°C",
                "日本\u{7f}\u{1f}",
                "\u{2028}x",
            ]
            .map(String::from),
        );
        for s in &strings {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
        let values = parse_kv("t=1 x=\"q\" f=2.50 big=18446744073709551616 e=-1E-3").unwrap();
        let body = reading_body("gw\"1", 9, "we\\ather", "2026-11-28T01:02:03.456Z", &values);
        let expected = json!({
            "gateway": "gw\"1", "seq": 9, "source": "we\\ather",
            "time": "2026-11-28T01:02:03.456Z",
            "values": {"t": 1, "x": "\"q\"", "f": 2.5, "big": 18446744073709551616.0, "e": -0.001}
        });
        assert_eq!(body, expected.to_string());
        let edge = Values::single("level", &json!(1));
        assert_eq!(edge.as_json(), r#"{"level":1}"#);
    }

    /// Duplicate keys are found past the scan limit too.
    #[test]
    fn kv_many_keys() {
        let line: Vec<String> = (0..40).map(|i| format!("k{i}={i}")).collect();
        let ok = parse_kv(&line.join(" ")).unwrap();
        assert_eq!(ok.to_map().len(), 40);
        for dup in [3, 20, 39] {
            let mut l = line.clone();
            l.push(format!("k{dup}=x"));
            assert_eq!(
                parse_kv(&l.join(",")),
                Err(LineError::DuplicateKey(format!("k{dup}")))
            );
        }
    }

    #[test]
    fn time_format() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z'));
    }
}
