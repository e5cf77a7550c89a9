//! Backend → gateway bodies: `command` (with its id rules and digest) and `ack`.

use super::{json_depth_exceeds, MAX_COMMAND_BYTES, MAX_JSON_DEPTH, MAX_WRITE_BYTES};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;

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

/// What a command asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Drive an output to 0 or 1 (or write 0 or 1 to a Modbus register or coil).
    Set(u8),
    /// Write a number other than 0 and 1 to a Modbus register (`set` with such a value;
    /// refused by GPIO outputs).
    SetNumber(f64),
    /// Invert an output.
    Toggle,
    /// Invert an output for `ms` milliseconds, then restore the previous level.
    Pulse(u64),
    /// Write a string (plus the port's line ending) to a serial port.
    Write(String),
}

impl Action {
    /// The action's name as written in a command (`set`, `toggle`, `pulse`, `write`).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Set(_) | Action::SetNumber(_) => "set",
            Action::Toggle => "toggle",
            Action::Pulse(_) => "pulse",
            Action::Write(_) => "write",
        }
    }
}

/// A parsed `command` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The backend's id for the command, echoed in the reply.
    pub id: String,
    /// The configured name of an output or serial port.
    pub target: String,
    /// What to do.
    pub action: Action,
}

impl Command {
    /// A digest of what the command does: its target and its parsed action (so `"value": 1`
    /// and `"value": true` of a `set` are the same command); the id is not part of it. Two
    /// commands with equal digests do the same thing. A [`StableDigest`] of fixed byte
    /// encodings, so it is the same in every run and every build: the gateway keeps it on
    /// disk with the command's reply.
    pub fn digest(&self) -> u64 {
        let mut h = StableDigest::new();
        // Length-prefixed fields: ("ab", "c") and ("a", "bc") digest differently.
        h.field(self.target.as_bytes());
        h.field(self.action.name().as_bytes());
        match &self.action {
            Action::Set(level) => h.field(&[*level]),
            Action::SetNumber(v) => h.field(&v.to_bits().to_le_bytes()),
            Action::Toggle => {}
            Action::Pulse(ms) => h.field(&ms.to_le_bytes()),
            Action::Write(text) => h.field(text.as_bytes()),
        }
        h.finish()
    }
}

/// A 64-bit FNV-1a digest: the same for the same bytes in every run, on every build (unlike
/// std's `DefaultHasher`, whose algorithm may change between Rust releases), so it may be
/// kept on disk. Not a cryptographic hash.
#[derive(Debug, Clone, Copy)]
pub struct StableDigest(u64);

impl StableDigest {
    /// An empty digest.
    pub fn new() -> StableDigest {
        StableDigest(0xcbf2_9ce4_8422_2325)
    }

    /// Adds `bytes` as they are.
    pub fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Adds `bytes` with their length in front (so field boundaries count).
    pub fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }

    /// The digest.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for StableDigest {
    fn default() -> StableDigest {
        StableDigest::new()
    }
}

/// A command that could not be parsed; `id` is known when the JSON had a string id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// The id to answer under; `None` when there is no single usable string id.
    pub id: Option<String>,
    /// Why the command was refused (the reply's `error`).
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
            // Any other number is for a Modbus register; a GPIO output refuses it.
            Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => {
                Action::SetNumber(n.as_f64().unwrap_or(0.0))
            }
            Some(other) => {
                return Err(bad(
                    Some(id),
                    format!("set: value must be a number, false or true, got {other}"),
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
