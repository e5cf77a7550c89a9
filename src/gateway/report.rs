//! Report on change: which readings of a source are sent, and when (the `report`,
//! `deadband`, `deadbands`, `min_interval_ms`, `max_interval_s` keys, [`ReportConfig`]).
//!
//! [`Reporter`] is the decision for one source, without I/O: it takes each reading with `now`
//! and answers [`Decision::Send`], [`Decision::Hold`] or [`Decision::Suppress`];
//! [`Reporter::deadline`] says when [`Reporter::on_timer`] must run next (a held reading's
//! release, a heartbeat). [`Reports`] keeps one per source name and one loop timer for all.
//!
//! The rules (docs/protocol.md, "Report on change", says them for users):
//! - A reading is *changed* when no reading was sent yet, when its keys differ from the last
//!   reading sent, when a numeric value moved more than its deadband from the value last sent
//!   (deadband 0: any difference), or when a non-numeric value differs. With `always`, and for
//!   sources whose readings are events ([`Kind::Events`], GPIO edges), every reading is changed.
//! - A changed reading is sent at once, unless the source sent one less than `min_interval`
//!   ago: then it is *held* (a newer changed reading replaces it) and sent with its own time
//!   when the interval ends. An unchanged reading is suppressed, and so is a held one it finds
//!   waiting: the source is back within the deadband of what the backend has.
//! - Heartbeat (`on_change` with `max_interval`): when `max_interval` passed since the last
//!   reading sent, a [`Kind::Samples`] source sends its newest reading not sent (with its own
//!   time); if it has none, the next reading it gives is sent at once whatever it holds
//!   ([`Decision::Heartbeat`]). A [`Kind::Events`] source reports its current state, timed
//!   now. A reading sent although it did not change is a heartbeat, and marked so.
//! - Every reading not sent when it came counts once in [`Reporter::suppressed`] (a held
//!   reading when it is replaced or dropped; a heartbeat may later send the newest
//!   suppressed sample, which stays counted: the counter only grows).

use super::effect::{Effect, Effects, TimerId};
use crate::config::{ReportConfig, ReportMode};
use crate::protocol::Values;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a source's readings are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Each reading is a sample of values (a serial line, a Modbus poll): compared with the
    /// last one sent; a source that stops giving readings sends no heartbeat.
    Samples,
    /// Each reading is an event (a GPIO edge): always a change; the source's state is known at
    /// any time, so a heartbeat reports it as of now.
    Events,
}

/// What to do with one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it now.
    Send,
    /// Send it now, marked as a heartbeat: it did not change, but `max_interval_s` passed.
    Heartbeat,
    /// Kept until [`Reporter::deadline`]; [`Reporter::on_timer`] then gives it back.
    Hold,
    /// Not sent (counted).
    Suppress,
}

/// A reading to send from [`Reporter::on_timer`].
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// Its values; `None`: the source's current state (a [`Kind::Events`] heartbeat).
    pub values: Option<Values>,
    /// When it was read: its `time` is this instant, not the moment it is sent.
    pub at: Instant,
    /// It is a heartbeat (sent because `max_interval_s` passed, not because it changed).
    pub heartbeat: bool,
}

#[derive(Debug, Clone)]
struct Kept {
    values: Values,
    at: Instant,
}

/// The report decision for one source (see the module doc).
#[derive(Debug, Clone)]
pub struct Reporter {
    cfg: ReportConfig,
    kind: Kind,
    min_interval: Duration,
    max_interval: Option<Duration>,
    /// The values last sent, parsed (only kept when readings are compared).
    last_values: Option<Map<String, Value>>,
    /// When the last reading was sent, or when the reporter started.
    last_at: Instant,
    /// Whether any reading was sent yet.
    sent_any: bool,
    /// A changed reading waiting for `min_interval` to end.
    held: Option<Kept>,
    /// The newest reading not sent (heartbeat material of a [`Kind::Samples`] source).
    latest: Option<Kept>,
    /// A heartbeat came due with nothing to send: the next reading is sent.
    overdue: bool,
    /// Readings not sent.
    pub suppressed: u64,
}

impl Reporter {
    /// A reporter starting at `now` (the heartbeat period counts from here).
    pub fn new(cfg: &ReportConfig, kind: Kind, now: Instant) -> Reporter {
        let mut r = Reporter {
            cfg: ReportConfig::default(),
            kind,
            min_interval: Duration::ZERO,
            max_interval: None,
            last_values: None,
            last_at: now,
            sent_any: false,
            held: None,
            latest: None,
            overdue: false,
            suppressed: 0,
        };
        r.reconfigure(cfg);
        r
    }

    /// Takes new settings (a configuration reload); what was sent, held and counted stays.
    pub fn reconfigure(&mut self, cfg: &ReportConfig) {
        self.cfg = cfg.clone();
        self.min_interval = Duration::from_millis(cfg.min_interval_ms);
        self.max_interval = (cfg.report == ReportMode::OnChange && cfg.max_interval_s > 0)
            .then(|| Duration::from_secs(cfg.max_interval_s));
    }

    /// The settings in force.
    pub fn config(&self) -> &ReportConfig {
        &self.cfg
    }

    fn compares(&self) -> bool {
        self.cfg.report == ReportMode::OnChange && self.kind == Kind::Samples
    }

    /// Whether `values` counts as changed from the last reading sent.
    fn changed(&self, values: &Map<String, Value>) -> bool {
        let Some(last) = &self.last_values else {
            return true;
        };
        if last.len() != values.len() {
            return true;
        }
        values.iter().any(|(key, new)| match last.get(key) {
            None => true,
            Some(old) => match (new.as_f64(), old.as_f64()) {
                (Some(n), Some(o)) => (n - o).abs() > self.cfg.deadband_of(key),
                _ => new != old,
            },
        })
    }

    fn sent(&mut self, values: Option<Map<String, Value>>, now: Instant) {
        if values.is_some() {
            self.last_values = values;
        }
        self.last_at = now;
        self.sent_any = true;
        self.overdue = false;
        self.latest = None;
    }

    /// A reading from the source at `now`.
    pub fn on_reading(&mut self, values: &Values, now: Instant) -> Decision {
        if self.cfg.passes_all() {
            // Nothing to compare or space out: no parse, no state beyond the time.
            self.sent(None, now);
            return Decision::Send;
        }
        let parsed = self.compares().then(|| values.to_map());
        let changed = parsed.as_ref().map_or(true, |m| self.changed(m));
        let heartbeat_due = self.overdue
            || self
                .max_interval
                .is_some_and(|max| now >= self.last_at + max);
        if !changed && !heartbeat_due {
            self.suppressed += 1;
            if self.held.take().is_some() {
                self.suppressed += 1;
            }
            if self.max_interval.is_some() {
                // Heartbeat material; without a heartbeat nothing ever sends it.
                self.latest = Some(Kept {
                    values: values.clone(),
                    at: now,
                });
            }
            return Decision::Suppress;
        }
        if self.sent_any && now < self.last_at + self.min_interval {
            let kept = Kept {
                values: values.clone(),
                at: now,
            };
            if self.held.replace(kept).is_some() {
                self.suppressed += 1;
            }
            self.latest = None;
            return Decision::Hold;
        }
        self.sent(parsed, now);
        if changed {
            Decision::Send
        } else {
            Decision::Heartbeat
        }
    }

    /// When [`Reporter::on_timer`] must run next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        if self.held.is_some() {
            return Some(self.last_at + self.min_interval);
        }
        match self.max_interval {
            Some(max) if !self.overdue => Some(self.last_at + max),
            _ => None,
        }
    }

    /// Time has come to `now`: the held reading or a heartbeat to send, if one is due.
    pub fn on_timer(&mut self, now: Instant) -> Option<Due> {
        if let Some(held) = &self.held {
            if now < self.last_at + self.min_interval {
                return None;
            }
            let Kept { values, at } = held.clone();
            self.held = None;
            let parsed = self.compares().then(|| values.to_map());
            self.sent(parsed, now);
            return Some(Due {
                values: Some(values),
                at,
                heartbeat: false,
            });
        }
        let max = self.max_interval?;
        if self.overdue || now < self.last_at + max {
            return None;
        }
        match self.kind {
            Kind::Events => {
                self.sent(None, now);
                Some(Due {
                    values: None,
                    at: now,
                    heartbeat: true,
                })
            }
            Kind::Samples => match self.latest.take() {
                Some(Kept { values, at }) => {
                    // It stays counted as suppressed (not sent when it came): the counter
                    // only grows.
                    let parsed = self.compares().then(|| values.to_map());
                    self.sent(parsed, now);
                    Some(Due {
                        values: Some(values),
                        at,
                        heartbeat: true,
                    })
                }
                None => {
                    self.overdue = true;
                    None
                }
            },
        }
    }
}

/// A reading [`Reports::on_timer`] releases.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    /// The source's name.
    pub source: String,
    /// What to send.
    pub due: Due,
}

/// One [`Reporter`] per reading source, by name, sharing one loop timer ([`TimerId::Report`]).
#[derive(Debug, Default)]
pub struct Reports {
    by_source: BTreeMap<String, Reporter>,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
}

impl Reports {
    /// Makes (or reconfigures, keeping its state) the reporter of `source`.
    pub fn set(&mut self, source: &str, cfg: &ReportConfig, kind: Kind, now: Instant) {
        match self.by_source.get_mut(source) {
            Some(r) if r.kind == kind => r.reconfigure(cfg),
            _ => {
                self.by_source
                    .insert(source.to_string(), Reporter::new(cfg, kind, now));
            }
        }
    }

    /// Drops every reporter whose source `keep` refuses; their held readings are returned, to
    /// be sent now (a reading is never lost silently).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Vec<Released> {
        let gone: Vec<String> = self
            .by_source
            .keys()
            .filter(|s| !keep(s))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for source in gone {
            if let Some(Reporter {
                held: Some(Kept { values, at }),
                ..
            }) = self.by_source.remove(&source)
            {
                out.push(Released {
                    source,
                    due: Due {
                        values: Some(values),
                        at,
                        heartbeat: false,
                    },
                });
            }
        }
        out
    }

    /// Takes every held reading, to be sent now (shutdown: a reading is never lost silently).
    pub fn take_held(&mut self) -> Vec<Released> {
        let mut out = Vec::new();
        for (source, r) in &mut self.by_source {
            if let Some(Kept { values, at }) = r.held.take() {
                out.push(Released {
                    source: source.clone(),
                    due: Due {
                        values: Some(values),
                        at,
                        heartbeat: false,
                    },
                });
            }
        }
        out
    }

    /// The reporter of `source`.
    pub fn get(&self, source: &str) -> Option<&Reporter> {
        self.by_source.get(source)
    }

    /// Every reporter, by source name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Reporter)> {
        self.by_source.iter()
    }

    /// A reading from `source`; a source without a reporter is sent as it comes.
    pub fn on_reading(
        &mut self,
        source: &str,
        values: &Values,
        now: Instant,
        fx: &mut Effects,
    ) -> Decision {
        let Some(r) = self.by_source.get_mut(source) else {
            return Decision::Send;
        };
        let d = r.on_reading(values, now);
        if let Some(at) = r.deadline() {
            self.arm(at, fx);
        }
        d
    }

    /// Arms the timer for `at` unless it is armed for that time or sooner.
    fn arm(&mut self, at: Instant, fx: &mut Effects) {
        if self.armed.map_or(true, |armed| at < armed) {
            self.armed = Some(at);
            fx.push(Effect::Arm(TimerId::Report, at));
        }
    }

    /// The timer fired at `now`: every reading due, in source order; the timer is armed
    /// again for the next deadline.
    pub fn on_timer(&mut self, now: Instant, fx: &mut Effects) -> Vec<Released> {
        self.armed = None;
        let mut out = Vec::new();
        let mut next: Option<Instant> = None;
        for (source, r) in &mut self.by_source {
            if r.deadline().is_some_and(|d| d <= now) {
                if let Some(due) = r.on_timer(now) {
                    out.push(Released {
                        source: source.clone(),
                        due,
                    });
                }
            }
            if let Some(d) = r.deadline() {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        if let Some(at) = next {
            self.arm(at, fx);
        }
        out
    }

    /// After a reload: arms the timer for the soonest deadline of all.
    pub fn rearm(&mut self, fx: &mut Effects) {
        self.armed = None;
        if let Some(at) = self.by_source.values().filter_map(Reporter::deadline).min() {
            self.arm(at, fx);
        }
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
