//! Known series, time driven by hand: exactly which readings come out, and when.

use super::*;
use crate::protocol::parse_kv;

fn cfg(text: &str) -> ReportConfig {
    toml::from_str(text).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn kv(text: &str) -> Values {
    parse_kv(text).unwrap()
}

/// Feeds `(ms, line)` readings, calling the timer whenever a deadline passes before the next
/// one (as the loop would), up to `end_ms`. Returns what went out: (sent at ms, read at ms,
/// line or "<state>", heartbeat).
fn run(
    r: &mut Reporter,
    t0: Instant,
    series: &[(u64, &str)],
    end_ms: u64,
) -> Vec<(u64, u64, String, bool)> {
    let mut out = Vec::new();
    let at_ms = |t: Instant| (t - t0).as_millis() as u64;
    let text = |v: &Values| v.as_json().to_string();
    let fire_until = |r: &mut Reporter, until: u64, out: &mut Vec<_>| {
        while let Some(d) = r.deadline().filter(|&d| at_ms(d) <= until) {
            if let Some(due) = r.on_timer(d) {
                let shown = due.values.as_ref().map_or("<state>".into(), text);
                out.push((at_ms(d), at_ms(due.at), shown, due.heartbeat));
            }
        }
    };
    for &(t, line) in series {
        fire_until(r, t, &mut out);
        let v = kv(line);
        match r.on_reading(&v, t0 + ms(t)) {
            Decision::Send => out.push((t, t, text(&v), false)),
            Decision::Heartbeat => out.push((t, t, text(&v), true)),
            Decision::Hold | Decision::Suppress => {}
        }
    }
    fire_until(r, end_ms, &mut out);
    out
}

fn sent(list: &[(u64, u64, &str, bool)]) -> Vec<(u64, u64, String, bool)> {
    list.iter()
        .map(|&(s, a, l, h)| (s, a, kv(l).as_json().to_string(), h))
        .collect()
}

#[test]
fn always_sends_everything_without_state() {
    let t0 = Instant::now();
    let mut r = Reporter::new(&cfg(""), Kind::Samples, t0);
    let series = [(0, "t=1"), (10, "t=1"), (20, "t=1")];
    let out = run(&mut r, t0, &series, 1000);
    assert_eq!(
        out,
        sent(&[
            (0, 0, "t=1", false),
            (10, 10, "t=1", false),
            (20, 20, "t=1", false)
        ])
    );
    assert_eq!(r.suppressed, 0);
    assert_eq!(r.deadline(), None);
}

/// The deadband is measured from the value last *sent*: a slow drift is reported once it
/// has moved more than the deadband in total; exactly the deadband is not a change.
#[test]
fn deadband_measures_from_the_value_last_sent() {
    let t0 = Instant::now();
    let c = cfg("report = \"on_change\"\ndeadband = 0.5\ndeadbands = { h = 2 }");
    let mut r = Reporter::new(&c, Kind::Samples, t0);
    let series = [
        (0, "t=20.0 h=40"),
        (1, "t=20.3 h=41"),       // within both deadbands
        (2, "t=20.5 h=42"),       // exactly 0.5 and exactly 2: not more than the deadband
        (3, "t=20.6 h=40"),       // t moved 0.6 from 20.0: sent
        (4, "t=20.6 h=40"),       // same
        (5, "t=20.6 h=37.9"),     // h moved 2.1: sent
        (6, "t=20.6 h=37.9 s=x"), // a key more: changed
        (7, "t=20.6 h=37.9 s=y"), // a string differs: changed
        (8, "t=20.6 h=37.9 s=y"),
        (9, "t=abc h=37.9 s=y"), // a number became a string: changed
    ];
    let out = run(&mut r, t0, &series, 100);
    assert_eq!(
        out,
        sent(&[
            (0, 0, "t=20.0 h=40", false),
            (3, 3, "t=20.6 h=40", false),
            (5, 5, "t=20.6 h=37.9", false),
            (6, 6, "t=20.6 h=37.9 s=x", false),
            (7, 7, "t=20.6 h=37.9 s=y", false),
            (9, 9, "t=abc h=37.9 s=y", false),
        ])
    );
    assert_eq!(r.suppressed, 4);
}

/// A change that comes too soon is held, replaced by newer changes, and sent with its own
/// time when the interval ends: the final state is never lost. A return to within the
/// deadband of what was sent drops the held one.
#[test]
fn min_interval_holds_the_latest_change_and_sends_it_at_the_end() {
    let t0 = Instant::now();
    let c = cfg("report = \"on_change\"\nmin_interval_ms = 100");
    let mut r = Reporter::new(&c, Kind::Samples, t0);
    let series = [
        (0, "t=1"),
        (10, "t=2"),  // held
        (20, "t=3"),  // replaces it (t=2 suppressed)
        (150, "t=4"), // interval over since 100 (t=3 went out then): held until 200
        (160, "t=3"), // back at what was sent: the held t=4 is dropped, t=3 suppressed
        (300, "t=5"), // sent at once
        (310, "t=6"), // held, and nothing else comes: sent at 400
    ];
    let out = run(&mut r, t0, &series, 1000);
    assert_eq!(
        out,
        sent(&[
            (0, 0, "t=1", false),
            (100, 20, "t=3", false),
            (300, 300, "t=5", false),
            (400, 310, "t=6", false),
        ])
    );
    // t=2 (replaced), t=4 (dropped), t=3 at 160 (unchanged).
    assert_eq!(r.suppressed, 3);
    assert_eq!(r.deadline(), None);
}

/// `always` with a minimum interval: a sampler that sends the newest reading of each interval.
#[test]
fn always_with_min_interval_sends_the_newest_of_each_interval() {
    let t0 = Instant::now();
    let mut r = Reporter::new(&cfg("min_interval_ms = 50"), Kind::Samples, t0);
    let series: Vec<(u64, String)> = (0..10).map(|i| (i * 10, format!("n={i}"))).collect();
    let series: Vec<(u64, &str)> = series.iter().map(|(t, l)| (*t, l.as_str())).collect();
    let out = run(&mut r, t0, &series, 1000);
    assert_eq!(
        out,
        sent(&[
            (0, 0, "n=0", false),
            (50, 40, "n=4", false),
            (100, 90, "n=9", false),
        ])
    );
    assert_eq!(r.suppressed, 7);
}

/// Heartbeat of a sampled source: after max_interval without a reading sent, the newest
/// unsent reading goes out with its own time; a source that gave nothing sends nothing
/// until its next reading, which then goes out whatever it holds.
#[test]
fn heartbeat_sends_the_newest_sample_or_waits_for_the_next() {
    let t0 = Instant::now();
    let c = cfg("report = \"on_change\"\ndeadband = 1\nmax_interval_s = 1");
    let mut r = Reporter::new(&c, Kind::Samples, t0);
    let series = [
        (0, "t=20"),
        (400, "t=20.5"),
        (700, "t=20.2"),  // the newest unsent at 1000
        (1500, "t=20.1"), // unchanged from 20.2, suppressed; newest at 2000
        // nothing from 2000 to 3000: at 3000 nothing to send; overdue
        (3500, "t=20.1"), // sent at once (overdue), unchanged or not
        (3600, "t=20.1"),
    ];
    let out = run(&mut r, t0, &series, 4200);
    assert_eq!(
        out,
        sent(&[
            (0, 0, "t=20", false),
            (1000, 700, "t=20.2", true),
            (2000, 1500, "t=20.1", true),
            (3500, 3500, "t=20.1", true),
        ])
    );
    assert_eq!(r.deadline(), Some(t0 + ms(4500)));
    let due = r.on_timer(t0 + ms(4500)).unwrap();
    assert_eq!(
        (due.values, due.at, due.heartbeat),
        (Some(kv("t=20.1")), t0 + ms(3600), true)
    );
    assert_eq!(r.on_timer(t0 + ms(5499)), None, "not due yet");
    assert_eq!(
        r.on_timer(t0 + ms(5500)),
        None,
        "nothing read since: nothing to send"
    );
    assert_eq!(r.deadline(), None, "and no wake-ups until the next reading");
    assert_eq!(r.suppressed, 4);
}

/// Events (GPIO edges): every edge is a change, the minimum interval holds the newest edge,
/// and a heartbeat asks for the current state, timed now.
#[test]
fn events_are_always_changes_and_heartbeats_report_the_state() {
    let t0 = Instant::now();
    let c = cfg("report = \"on_change\"\nmin_interval_ms = 100\nmax_interval_s = 2");
    let mut r = Reporter::new(&c, Kind::Events, t0);
    let series = [
        (0, "level=1"),
        (500, "level=1"), // a second rising edge: an edge, not a repeat
        (550, "level=0"), // too soon: held
        (560, "level=1"), // replaces it
    ];
    let out = run(&mut r, t0, &series, 3000);
    assert_eq!(
        out,
        vec![
            (0, 0, kv("level=1").as_json().into(), false),
            (500, 500, kv("level=1").as_json().into(), false),
            (600, 560, kv("level=1").as_json().into(), false),
            (2600, 2600, "<state>".into(), true),
        ]
    );
    assert_eq!(r.suppressed, 1);
    assert_eq!(r.deadline(), Some(t0 + ms(4600)));
}

/// Several sources share one timer: it is armed for the soonest deadline, and firing
/// releases exactly what is due.
#[test]
fn reports_share_one_timer() {
    let t0 = Instant::now();
    let mut reps = Reports::default();
    let mut fx = Effects::default();
    reps.set("a", &cfg("min_interval_ms = 100"), Kind::Samples, t0);
    reps.set("b", &cfg("min_interval_ms = 30"), Kind::Samples, t0);
    let d = |reps: &mut Reports, s: &str, l: &str, t: u64, fx: &mut Effects| {
        reps.on_reading(s, &kv(l), t0 + ms(t), fx)
    };
    assert_eq!(d(&mut reps, "a", "x=1", 0, &mut fx), Decision::Send);
    assert_eq!(d(&mut reps, "b", "x=1", 0, &mut fx), Decision::Send);
    assert_eq!(d(&mut reps, "a", "x=2", 5, &mut fx), Decision::Hold);
    assert_eq!(d(&mut reps, "b", "x=2", 6, &mut fx), Decision::Hold);
    assert_eq!(d(&mut reps, "zz", "x=2", 6, &mut fx), Decision::Send);
    assert_eq!(
        fx.drain(),
        vec![
            Effect::Arm(TimerId::Report, t0 + ms(100)),
            Effect::Arm(TimerId::Report, t0 + ms(30)),
        ]
    );
    let out = reps.on_timer(t0 + ms(30), &mut fx);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].source, "b");
    assert_eq!(out[0].due.at, t0 + ms(6));
    assert_eq!(fx.drain(), vec![Effect::Arm(TimerId::Report, t0 + ms(100))]);
    let out = reps.on_timer(t0 + ms(100), &mut fx);
    assert_eq!((out.len(), out[0].source.as_str()), (1, "a"));
    assert!(fx.is_empty());
    // A held reading of a source that goes away is handed back, not lost.
    assert_eq!(d(&mut reps, "a", "x=3", 150, &mut fx), Decision::Hold);
    let gone = reps.retain(|s| s == "b");
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].due.values, Some(kv("x=3")));
    assert!(reps.get("a").is_none() && reps.get("b").is_some());
}

/// A reload keeps what was sent and held; new settings apply from the next reading.
#[test]
fn reconfigure_keeps_state() {
    let t0 = Instant::now();
    let mut reps = Reports::default();
    let mut fx = Effects::default();
    let on = cfg("report = \"on_change\"\ndeadband = 5");
    reps.set("s", &on, Kind::Samples, t0);
    assert_eq!(
        reps.on_reading("s", &kv("t=1"), t0, &mut fx),
        Decision::Send
    );
    assert_eq!(
        reps.on_reading("s", &kv("t=3"), t0, &mut fx),
        Decision::Suppress
    );
    reps.set(
        "s",
        &cfg("report = \"on_change\"\ndeadband = 1"),
        Kind::Samples,
        t0,
    );
    assert_eq!(
        reps.on_reading("s", &kv("t=3"), t0, &mut fx),
        Decision::Send
    );
    assert_eq!(reps.get("s").unwrap().suppressed, 1);
}
