//! Re-dating readings made while a gateway's clock was not synchronised (docs/protocol.md,
//! "Honest timestamps").
//!
//! Such a reading carries `"clock": "unsynced"`, `mono_ms` (the gateway's CLOCK_BOOTTIME when
//! it was read) and `boot_id`. A `hello` or `stats` with `"clock": "synced"` of the same boot
//! pairs a right wall-clock `time` with its `mono_ms`, so
//! `true_time = synced_time - (synced_mono_ms - reading_mono_ms)`.
//!
//! [`Redater::on_reading`] dates a reading at once when its boot's synced pair is known;
//! otherwise it keeps (seq, source, mono_ms) — at most [`MAX_PENDING`] per gateway, the oldest
//! dropped first — and [`Redater::on_status`] returns one `time_corrected` line for each
//! when the synced pair arrives.

use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, UNIX_EPOCH};

/// Readings kept per gateway while waiting for a synced `hello`/`stats`.
pub const MAX_PENDING: usize = 100_000;

#[derive(Debug)]
struct Pending {
    boot_id: String,
    mono_ms: u64,
    seq: u64,
    source: Value,
    spool_id: String,
}

#[derive(Debug, Default)]
struct PerGateway {
    /// boot_id → (synced wall-clock ms since the epoch, mono_ms at that moment).
    synced: HashMap<String, (i128, u64)>,
    pending: VecDeque<Pending>,
    dropped: u64,
}

/// Re-dates unsynced readings, per gateway (see the module doc).
#[derive(Debug, Default)]
pub struct Redater {
    gateways: HashMap<Vec<u8>, PerGateway>,
}

/// `true_time` in ms since the epoch, from a synced pair and a reading's `mono_ms`.
pub fn true_time_ms(synced_ms: i128, synced_mono_ms: u64, reading_mono_ms: u64) -> i128 {
    synced_ms - (synced_mono_ms as i128 - reading_mono_ms as i128)
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds; `None` before 1970.
fn rfc3339(ms: i128) -> Option<String> {
    let ms = u64::try_from(ms).ok()?;
    let t = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// The (boot_id, mono_ms) of an unsynced message.
fn unsynced(body: &Value) -> Option<(&str, u64)> {
    if body.get("clock")?.as_str()? != "unsynced" {
        return None;
    }
    Some((
        body.get("boot_id")?.as_str()?,
        body.get("mono_ms")?.as_u64()?,
    ))
}

impl Redater {
    /// A new reading from `gateway` (of spool `spool_id`): its `time_corrected` when it was
    /// made unsynced and its boot's synced pair is known; `None` when it needs none or must
    /// wait (then it is kept for [`Redater::on_status`]).
    pub fn on_reading(&mut self, gateway: &[u8], spool_id: &str, body: &Value) -> Option<String> {
        let (boot_id, mono_ms) = unsynced(body)?;
        let g = self.gateways.entry(gateway.to_vec()).or_default();
        if let Some(&(synced_ms, synced_mono)) = g.synced.get(boot_id) {
            return rfc3339(true_time_ms(synced_ms, synced_mono, mono_ms));
        }
        if g.pending.len() >= MAX_PENDING {
            g.pending.pop_front();
            g.dropped += 1;
            if g.dropped.is_power_of_two() {
                log::warn!(
                    "gateway={} unsynced readings waiting for a synced clock exceed \
                     {MAX_PENDING}: the oldest are not re-dated dropped={}",
                    String::from_utf8_lossy(gateway),
                    g.dropped
                );
            }
        }
        g.pending.push_back(Pending {
            boot_id: boot_id.to_string(),
            mono_ms,
            seq: body.get("seq").and_then(Value::as_u64).unwrap_or(0),
            source: body.get("source").cloned().unwrap_or(Value::Null),
            spool_id: spool_id.to_string(),
        });
        None
    }

    /// A `hello` or `stats` from `gateway`: when it says `"clock": "synced"`, its (`time`,
    /// `mono_ms`) becomes the pair of its boot, and every reading of that boot still waiting
    /// gets a line `{"kind": "time_corrected", "gateway", "spool_id", "seq", "source",
    /// "time_corrected"}`.
    pub fn on_status(&mut self, gateway: &[u8], body: &Value) -> Vec<Value> {
        let synced = body.get("clock").and_then(Value::as_str) == Some("synced");
        let pair = (|| {
            let boot_id = body.get("boot_id")?.as_str()?;
            let mono = body.get("mono_ms")?.as_u64()?;
            let time = humantime::parse_rfc3339(body.get("time")?.as_str()?).ok()?;
            let ms = time.duration_since(UNIX_EPOCH).ok()?.as_millis() as i128;
            Some((boot_id.to_string(), ms, mono))
        })();
        let (true, Some((boot_id, synced_ms, synced_mono))) = (synced, pair) else {
            return Vec::new();
        };
        let g = self.gateways.entry(gateway.to_vec()).or_default();
        g.synced.insert(boot_id.clone(), (synced_ms, synced_mono));
        let name = String::from_utf8_lossy(gateway);
        let mut out = Vec::new();
        g.pending.retain(|p| {
            if p.boot_id != boot_id {
                return true;
            }
            if let Some(t) = rfc3339(true_time_ms(synced_ms, synced_mono, p.mono_ms)) {
                out.push(json!({
                    "kind": "time_corrected", "gateway": name, "spool_id": p.spool_id,
                    "seq": p.seq, "source": p.source, "time_corrected": t,
                }));
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of docs/protocol.md.
    #[test]
    fn worked_example() {
        let mut r = Redater::default();
        let reading = json!({"seq": 7, "source": "weather", "time": "1970-01-01T00:00:42.000Z",
            "clock": "unsynced", "mono_ms": 42_000, "boot_id": "b1"});
        assert_eq!(
            r.on_reading(b"gw", "s1", &reading),
            None,
            "no synced pair yet"
        );
        let unsynced_stats = json!({"clock": "unsynced", "boot_id": "b1", "mono_ms": 50_000,
            "time": "1970-01-01T00:00:50.000Z"});
        assert!(r.on_status(b"gw", &unsynced_stats).is_empty());
        let synced = json!({"clock": "synced", "boot_id": "b1", "mono_ms": 600_000,
            "time": "2026-12-03T06:10:00.000Z"});
        let lines = r.on_status(b"gw", &synced);
        assert_eq!(
            lines,
            vec![
                json!({"kind": "time_corrected", "gateway": "gw", "spool_id": "s1", "seq": 7,
                "source": "weather", "time_corrected": "2026-12-03T06:00:42.000Z"})
            ]
        );
        // Known pair: the next unsynced reading of that boot is dated at once.
        let later = json!({"seq": 8, "clock": "unsynced", "mono_ms": 599_500, "boot_id": "b1"});
        assert_eq!(
            r.on_reading(b"gw", "s1", &later).as_deref(),
            Some("2026-12-03T06:09:59.500Z")
        );
        // Another boot's readings wait for that boot's pair; synced readings need nothing.
        let other = json!({"seq": 9, "clock": "unsynced", "mono_ms": 1_000, "boot_id": "b2"});
        assert_eq!(r.on_reading(b"gw", "s1", &other), None);
        assert!(r.on_status(b"gw", &synced).is_empty());
        assert_eq!(r.on_reading(b"gw", "s1", &json!({"seq": 10})), None);
        // Another gateway's pair does not date this gateway's readings.
        assert!(r
            .on_status(
                b"gw2",
                &json!({"clock": "synced", "boot_id": "b2",
            "mono_ms": 2_000, "time": "2026-12-03T06:10:00.000Z"})
            )
            .is_empty());
    }

    #[test]
    fn pending_is_bounded() {
        let mut r = Redater::default();
        for seq in 0..(MAX_PENDING as u64 + 5) {
            let b = json!({"seq": seq, "clock": "unsynced", "mono_ms": seq, "boot_id": "b"});
            r.on_reading(b"gw", "s", &b);
        }
        let lines = r.on_status(
            b"gw",
            &json!({"clock": "synced", "boot_id": "b",
            "mono_ms": 0, "time": "2026-12-03T06:10:00.000Z"}),
        );
        assert_eq!(lines.len(), MAX_PENDING);
        assert_eq!(lines[0]["seq"], 5);
    }
}
