//! The report-on-change keys that every reading source's table embeds (`[[serial]]`,
//! `[[gpio.input]]`, and any later source): `report`, `deadband`, `deadbands`,
//! `min_interval_ms`, `max_interval_s`. What they do is decided by
//! [`crate::gateway::report::Reporter`]; docs/protocol.md ("Report on change") says it for
//! users.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// `report`: which readings of a source are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReportMode {
    /// Every reading (`"always"`, the default), at most one per `min_interval_ms`.
    #[default]
    Always,
    /// Only readings that differ from the last one sent (`"on_change"`), beyond the
    /// deadband, plus a heartbeat every `max_interval_s`.
    OnChange,
}

impl<'de> Deserialize<'de> for ReportMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReportMode, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "always" => Ok(ReportMode::Always),
            "on_change" => Ok(ReportMode::OnChange),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a report mode: use \"always\" or \"on_change\""
            ))),
        }
    }
}

impl fmt::Display for ReportMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReportMode::Always => "always",
            ReportMode::OnChange => "on_change",
        })
    }
}

/// Longest `min_interval_ms`: one day.
pub const MAX_MIN_INTERVAL_MS: u64 = 86_400_000;
/// Longest `max_interval_s`: one week.
pub const MAX_MAX_INTERVAL_S: u64 = 7 * 86_400;

/// The five report keys of one reading source (embedded with `#[serde(flatten)]`).
///
/// A flattened key's type error carries no position of its own: each key's error starts with
/// `<key>: `, which the config loader uses to name the key and its line.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct ReportConfig {
    /// `"always"` (default) or `"on_change"`.
    #[serde(default, deserialize_with = "named::report")]
    pub report: ReportMode,
    /// `on_change`: a numeric value counts as changed when it moved *more* than this (absolute)
    /// from the value last sent (default 0: any difference).
    #[serde(default, deserialize_with = "named::deadband")]
    pub deadband: f64,
    /// `on_change`: a deadband per key of `values`, overriding `deadband` for that key.
    #[serde(default, deserialize_with = "named::deadbands")]
    pub deadbands: BTreeMap<String, f64>,
    /// Never send a reading of this source sooner than this many ms after its previous one
    /// (default 0). A reading that comes sooner is held, replaced by any newer one, and sent
    /// when the interval ends.
    #[serde(default, deserialize_with = "named::min_interval_ms")]
    pub min_interval_ms: u64,
    /// `on_change`: send a heartbeat after this many seconds without a reading sent
    /// (default 0: never).
    #[serde(default, deserialize_with = "named::max_interval_s")]
    pub max_interval_s: u64,
}

/// Deserializers that put the key's name in front of its error.
mod named {
    use super::*;
    use serde::Deserializer;

    fn named<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        key: &str,
        d: D,
    ) -> Result<T, D::Error> {
        T::deserialize(d).map_err(|e| serde::de::Error::custom(format!("{key}: {e}")))
    }
    pub fn report<'de, D: Deserializer<'de>>(d: D) -> Result<ReportMode, D::Error> {
        named("report", d)
    }
    pub fn deadband<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        named("deadband", d)
    }
    pub fn deadbands<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        named("deadbands", d)
    }
    pub fn min_interval_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        named("min_interval_ms", d)
    }
    pub fn max_interval_s<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        named("max_interval_s", d)
    }
}

impl ReportConfig {
    /// The deadband of `key`: its `deadbands` entry, else `deadband`.
    pub fn deadband_of(&self, key: &str) -> f64 {
        self.deadbands.get(key).copied().unwrap_or(self.deadband)
    }

    /// Whether every reading passes straight through (`always`, no `min_interval_ms`).
    pub fn passes_all(&self) -> bool {
        self.report == ReportMode::Always && self.min_interval_ms == 0
    }

    /// Checks ranges and combinations; `Err((key, message))` names the offending key.
    /// `numeric` is false for a source whose readings are events that always count as
    /// changed (a GPIO input's edges): a deadband is then refused.
    pub fn check(&self, numeric: bool) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: String| Err((key.to_string(), msg));
        let on_change = self.report == ReportMode::OnChange;
        if !(self.deadband.is_finite() && self.deadband >= 0.0) {
            return bad("deadband", "must be a number, 0 or more".into());
        }
        for (key, d) in &self.deadbands {
            if !(d.is_finite() && *d >= 0.0) {
                return bad(
                    "deadbands",
                    format!("{key} = {d}: a deadband must be a number, 0 or more"),
                );
            }
        }
        let has_deadband = self.deadband != 0.0 || !self.deadbands.is_empty();
        if has_deadband && !numeric {
            let key = if self.deadband != 0.0 {
                "deadband"
            } else {
                "deadbands"
            };
            return bad(
                key,
                "a GPIO input has no deadband: every edge it reports is a change".into(),
            );
        }
        if has_deadband && !on_change {
            let key = if self.deadband != 0.0 {
                "deadband"
            } else {
                "deadbands"
            };
            return bad(
                key,
                "only applies with report = \"on_change\" (this source reports always)".into(),
            );
        }
        if self.min_interval_ms > MAX_MIN_INTERVAL_MS {
            return bad(
                "min_interval_ms",
                format!("must be at most {MAX_MIN_INTERVAL_MS} (one day)"),
            );
        }
        if self.max_interval_s > MAX_MAX_INTERVAL_S {
            return bad(
                "max_interval_s",
                format!("must be at most {MAX_MAX_INTERVAL_S} (one week)"),
            );
        }
        if self.max_interval_s != 0 && !on_change {
            return bad(
                "max_interval_s",
                "only applies with report = \"on_change\" (with \"always\" every reading is \
                 sent; a heartbeat would repeat one)"
                    .into(),
            );
        }
        if self.max_interval_s != 0 && self.max_interval_s * 1000 < self.min_interval_ms {
            return bad(
                "max_interval_s",
                format!(
                    "{} s is shorter than min_interval_ms = {}: a heartbeat cannot come sooner \
                     than the minimum interval",
                    self.max_interval_s, self.min_interval_ms
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> ReportConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn keys_parse_with_defaults() {
        let c = cfg("");
        assert_eq!(c, ReportConfig::default());
        assert!(c.passes_all());
        let c = cfg(
            "report = \"on_change\"\ndeadband = 0.5\ndeadbands = { t = 0.2 }\n\
             min_interval_ms = 100\nmax_interval_s = 60\n",
        );
        assert_eq!(c.report, ReportMode::OnChange);
        assert_eq!(c.deadband_of("t"), 0.2);
        assert_eq!(c.deadband_of("h"), 0.5);
        assert!(!c.passes_all());
        assert_eq!(c.check(true), Ok(()));
        let e = toml::from_str::<ReportConfig>("report = \"sometimes\"").unwrap_err();
        assert!(
            e.message().contains("use \"always\" or \"on_change\""),
            "{e}"
        );
    }

    #[test]
    fn bad_combinations_name_their_key() {
        let key = |text: &str, numeric| cfg(text).check(numeric).unwrap_err().0;
        assert_eq!(
            key("deadband = -1.0\nreport = \"on_change\"", true),
            "deadband"
        );
        assert_eq!(
            key("deadbands = { t = -0.1 }\nreport = \"on_change\"", true),
            "deadbands"
        );
        assert_eq!(key("deadband = 1.0", true), "deadband");
        assert_eq!(
            key("deadband = 1.0\nreport = \"on_change\"", false),
            "deadband"
        );
        assert_eq!(key("max_interval_s = 5", true), "max_interval_s");
        assert_eq!(
            key(
                "report = \"on_change\"\nmax_interval_s = 1\nmin_interval_ms = 1001",
                true
            ),
            "max_interval_s"
        );
        assert_eq!(key("min_interval_ms = 86400001", true), "min_interval_ms");
        let e = toml::from_str::<ReportConfig>("min_interval_ms = \"x\"").unwrap_err();
        assert!(
            e.message().starts_with("min_interval_ms: invalid type"),
            "{e}"
        );
        assert_eq!(cfg("min_interval_ms = 500").check(false), Ok(()));
    }

    /// Through a whole file: the error names the file, line and dotted key; the keys are
    /// accepted on serial ports and GPIO inputs, and unknown keys beside them still refused.
    #[test]
    fn errors_in_a_file_name_line_and_key() {
        use crate::config::Config;
        let head = "[gateway]\nid = \"g\"\n";
        let serial = |extra: &str| {
            format!("{head}[[serial]]\nname = \"s\"\npath = \"/dev/null\"\n{extra}\n")
        };
        let e = Config::parse(&serial("deadband = 0.5"), "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "serial.deadband"), "{e}");
        let input = "[gpio]\nbackend = \"sim\"\n[[gpio.input]]\nname = \"d\"\npin = 4\n\
                     report = \"on_change\"\ndeadband = 1.0\n";
        let e = Config::parse(&format!("{head}{input}"), "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (9, "gpio.input.deadband"), "{e}");
        assert!(e.message.contains("every edge"), "{e}");
        let e = Config::parse(&serial("reportt = \"always\""), "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "serial.reportt"), "{e}");
        let e = Config::parse(&format!("{head}{input}pinn = 3\n"), "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (10, "gpio.input.pinn"), "{e}");
        // A flattened key's type error names the key and its line too.
        let e = Config::parse(&serial("\nmax_interval_s = -1"), "z.toml").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (7, "serial.max_interval_s"),
            "{e}"
        );
        assert!(e.message.starts_with("invalid value"), "{e}");
        let e = Config::parse(&serial("report = \"sometimes\""), "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "serial.report"), "{e}");
        assert!(e.message.contains("use \"always\" or \"on_change\""), "{e}");
        let ok = serial(
            "report = \"on_change\"\ndeadbands = { t = 0.2 }\nmin_interval_ms = 10\n\
             max_interval_s = 5",
        );
        let c = Config::parse(&ok, "z.toml").unwrap();
        assert_eq!(c.serial[0].report.deadband_of("t"), 0.2);
        assert_eq!(c.serial[0].report.max_interval_s, 5);
        let t = Config::parse(crate::config::TEMPLATE, "template").unwrap();
        assert_eq!(t.serial[0].report, ReportConfig::default());
        assert_eq!(t.gpio.input[0].report, ReportConfig::default());
    }
}
