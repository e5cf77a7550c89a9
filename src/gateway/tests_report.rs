//! Report on change and honest timestamps through the interpreter: a real loop, spool, sim
//! GPIO (files + inotify) and a clock status driven by the test.

use super::*;
use crate::clock::{ClockWatch, Fake};
use crate::hw::sim::write_pin_file;
use crate::hw::Level;
use serde_json::Value;
use std::cell::Cell;
use std::rc::Rc;

fn gateway(dir: &std::path::Path, input_extra: &str) -> (EventLoop<'static, Gateway>, Gateway) {
    write_pin_file(dir, 17, Level::High).unwrap();
    let text = format!(
        "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
         [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
         [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
         [[gpio.input]]\nname = \"door\"\npin = 17\ndebounce_ms = 0\n{input_extra}\n",
        dir.display()
    );
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let ev = EventLoop::try_new().unwrap();
    let gw = Gateway::new(cfg, &ev).unwrap();
    (ev, gw)
}

fn bodies(gw: &Gateway, kind: &str) -> Vec<Value> {
    gw.outbox.peek(|o| {
        o.iter()
            .filter(|m| m.kind == kind)
            .map(|m| serde_json::from_str(&m.body).unwrap())
            .collect()
    })
}

/// Runs the loop until `pred` holds (or 5 s pass: a failure).
fn run_until(
    ev: &mut EventLoop<'static, Gateway>,
    gw: &mut Gateway,
    what: &str,
    pred: impl Fn(&Gateway) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pred(gw) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        ev.dispatch(Some(Duration::from_millis(10)), gw).unwrap();
    }
}

fn run_for(ev: &mut EventLoop<'static, Gateway>, gw: &mut Gateway, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        ev.dispatch(Some(Duration::from_millis(10)), gw).unwrap();
    }
}

fn fake_clock(gw: &mut Gateway, synced: bool) -> Rc<Cell<bool>> {
    let flag = Rc::new(Cell::new(synced));
    gw.clock = ClockWatch::new(Box::new(Fake {
        synced: flag.clone(),
        asked: Rc::new(Cell::new(0)),
    }));
    flag
}

fn ms_of(time: &Value) -> i128 {
    let t = humantime::parse_rfc3339(time.as_str().unwrap()).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i128
}

/// GPIO edges through the loop with `min_interval_ms` and a heartbeat: an edge too soon is
/// held and sent at the interval's end with the time it happened; the heartbeat carries the
/// current level, marked, after `max_interval_s` without a reading.
#[test]
fn gpio_edges_are_spaced_and_heartbeats_follow() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "report = \"on_change\"\nmin_interval_ms = 300\nmax_interval_s = 1";
    let (mut ev, mut gw) = gateway(dir.path(), extra);
    let door = |gw: &Gateway| {
        bodies(gw, protocol::KIND_READING)
            .into_iter()
            .filter(|b| b["source"] == "door")
            .collect::<Vec<_>>()
    };
    let t0 = std::time::SystemTime::now();
    write_pin_file(dir.path(), 17, Level::Low).unwrap();
    run_until(&mut ev, &mut gw, "the first edge", |gw| door(gw).len() == 1);
    let first_at = Instant::now();
    // Two more edges at once: the first replaced by the second, held until 300 ms.
    write_pin_file(dir.path(), 17, Level::High).unwrap();
    run_for(&mut ev, &mut gw, Duration::from_millis(50));
    write_pin_file(dir.path(), 17, Level::Low).unwrap();
    let low_at = std::time::SystemTime::now();
    run_for(&mut ev, &mut gw, Duration::from_millis(100));
    assert_eq!(door(&gw).len(), 1, "held, not sent: {:?}", door(&gw));
    run_until(&mut ev, &mut gw, "the held edge", |gw| door(gw).len() == 2);
    assert!(first_at.elapsed() >= Duration::from_millis(280));
    let r = door(&gw);
    assert_eq!(r[0]["values"], json!({"level": 0}));
    assert_eq!(r[1]["values"], json!({"level": 0}));
    assert!(r[1].get("heartbeat").is_none());
    // Its time is when the edge happened, not when it was sent.
    let low_ms = ms_of(&json!(humantime::format_rfc3339_millis(low_at).to_string()));
    assert!((ms_of(&r[1]["time"]) - low_ms).abs() < 60, "{r:?}");
    assert!(
        ms_of(&r[0]["time"]) >= ms_of(&json!(humantime::format_rfc3339_millis(t0).to_string()))
    );
    assert_eq!(gw.reports.get("door").unwrap().suppressed, 1);
    // 1 s after the held edge went out: a heartbeat with the level as it is now.
    let sent_at = Instant::now();
    run_until(&mut ev, &mut gw, "a heartbeat", |gw| door(gw).len() == 3);
    let waited = sent_at.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    let hb = &door(&gw)[2];
    assert_eq!(hb["values"], json!({"level": 0}));
    assert_eq!(hb["heartbeat"], json!(true));
    let stats = gw.stats_now();
    let stats: Value = serde_json::from_str(&stats.body).unwrap();
    assert_eq!(stats["counters"]["suppressed"], json!({"door": 1}));
}

/// Unsynced → synced through the clock status: readings made while unsynced carry `clock`,
/// `mono_ms` and `boot_id`; `hello` and `stats` always carry `clock`, `boot_id`, `mono_ms`;
/// and the re-dating rule applied with a later synced `stats` gives the reading's time back.
#[test]
fn unsynced_readings_carry_boot_time_and_can_be_redated() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ev, mut gw) = gateway(dir.path(), "");
    let synced = fake_clock(&mut gw, false);
    let boot_id = crate::clock::boot_id();
    let before = crate::clock::boottime_ms();
    write_pin_file(dir.path(), 17, Level::Low).unwrap();
    let count = |gw: &Gateway| bodies(gw, protocol::KIND_READING).len();
    run_until(&mut ev, &mut gw, "an unsynced reading", |gw| count(gw) == 1);
    let after = crate::clock::boottime_ms();
    let r = bodies(&gw, protocol::KIND_READING).remove(0);
    assert_eq!(r["clock"], "unsynced");
    assert_eq!(r["boot_id"], json!(boot_id));
    let mono = r["mono_ms"].as_u64().unwrap();
    assert!((before..=after).contains(&mono), "{before} {mono} {after}");
    let hello: Value = serde_json::from_str(&gw.hello().body).unwrap();
    assert_eq!(
        (&hello["clock"], &hello["boot_id"]),
        (&json!("unsynced"), &json!(boot_id))
    );
    assert!(hello["mono_ms"].as_u64().unwrap() >= after);
    assert!(hello["time"].is_string());
    let stats: Value = serde_json::from_str(&gw.stats_now().body).unwrap();
    assert_eq!(stats["clock"], "unsynced");

    // NTP synchronises. The status is asked again at most once a second.
    synced.set(true);
    run_for(&mut ev, &mut gw, Duration::from_millis(1050));
    write_pin_file(dir.path(), 17, Level::High).unwrap();
    run_until(&mut ev, &mut gw, "a synced reading", |gw| count(gw) == 2);
    let r2 = bodies(&gw, protocol::KIND_READING).remove(1);
    for key in ["clock", "mono_ms", "boot_id"] {
        assert!(r2.get(key).is_none(), "{r2}");
    }
    let stats: Value = serde_json::from_str(&gw.stats_now().body).unwrap();
    assert_eq!(
        (&stats["clock"], &stats["boot_id"]),
        (&json!("synced"), &json!(boot_id))
    );
    // true_time = synced_time - (synced_mono_ms - reading_mono_ms). This clock was right all
    // along, so the re-dated time is the reading's own, within the ms rounding of each side.
    let synced_ms = ms_of(&stats["time"]);
    let synced_mono = stats["mono_ms"].as_u64().unwrap() as i128;
    let true_ms = synced_ms - (synced_mono - mono as i128);
    assert!((true_ms - ms_of(&r["time"])).abs() <= 3, "{true_ms} vs {r}");
}

/// A reading held by `min_interval_ms` when the gateway stops is stored and sent during the
/// shutdown flush, not lost.
#[test]
fn held_readings_are_stored_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ev, mut gw) = gateway(dir.path(), "min_interval_ms = 60000");
    let count = |gw: &Gateway| bodies(gw, protocol::KIND_READING).len();
    write_pin_file(dir.path(), 17, Level::Low).unwrap();
    run_until(&mut ev, &mut gw, "the first edge", |gw| count(gw) == 1);
    write_pin_file(dir.path(), 17, Level::High).unwrap();
    run_for(&mut ev, &mut gw, Duration::from_millis(100));
    assert_eq!(count(&gw), 1, "held");
    gw.begin_shutdown();
    let r = bodies(&gw, protocol::KIND_READING);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (&r[1]["seq"], &r[1]["values"]),
        (&json!(2), &json!({"level": 1}))
    );
    assert_eq!(gw.spool.next_seq(), 3, "stored in the spool");
}

/// A reload applies new report settings to a kept input, and a held reading of an input the
/// reload removes is sent at once.
#[test]
fn reload_applies_report_settings_and_releases_removed_sources() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ev, mut gw) = gateway(dir.path(), "");
    let count = |gw: &Gateway| bodies(gw, protocol::KIND_READING).len();
    let with = |extra: &str| {
        let text = format!(
            "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
             [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
             [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n{extra}",
            dir.path().display()
        );
        Config::parse(&text, "t.toml").unwrap()
    };
    let door = "[[gpio.input]]\nname = \"door\"\npin = 17\ndebounce_ms = 0\n";
    let plan = reload::ReloadPlan::new(&gw.cfg, with(&format!("{door}min_interval_ms = 60000")));
    gw.apply_reload(plan);
    assert_eq!(
        gw.reports.get("door").unwrap().config().min_interval_ms,
        60000
    );
    write_pin_file(dir.path(), 17, Level::Low).unwrap();
    run_until(&mut ev, &mut gw, "the first edge", |gw| count(gw) == 1);
    write_pin_file(dir.path(), 17, Level::High).unwrap();
    run_for(&mut ev, &mut gw, Duration::from_millis(100));
    assert_eq!(count(&gw), 1, "the second edge is held");
    let plan = reload::ReloadPlan::new(&gw.cfg, with(""));
    gw.apply_reload(plan);
    assert!(gw.reports.get("door").is_none());
    let r = bodies(&gw, protocol::KIND_READING);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (&r[1]["source"], &r[1]["values"]),
        (&json!("door"), &json!({"level": 1}))
    );
}
