//! Interpreter tests of output level readings and the command log: a real loop, spool, sim
//! GPIO and files, no backend.

use super::*;
use crate::hw::sim::read_pin_file;
use crate::hw::Level;

fn gateway(dir: &std::path::Path) -> (EventLoop<'static, Gateway>, Gateway) {
    let text = format!(
        "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
         [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
         [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
         [[gpio.output]]\nname = \"relay1\"\npin = 27\ninitial = \"keep\"\n\
         [[gpio.output]]\nname = \"relay2\"\npin = 22\ninitial = 1\n",
        dir.display()
    );
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let ev = EventLoop::try_new().unwrap();
    let gw = Gateway::new(cfg, &ev).unwrap();
    (ev, gw)
}

/// (seq, source, values) of the readings in the outbox.
fn readings(gw: &Gateway) -> Vec<(u64, String, serde_json::Value)> {
    gw.outbox.peek(|o| {
        o.iter()
            .filter(|m| m.kind == protocol::KIND_READING)
            .map(|m| {
                let v: serde_json::Value = serde_json::from_str(&m.body).unwrap();
                let seq = v["seq"].as_u64().unwrap();
                (
                    seq,
                    v["source"].as_str().unwrap().to_string(),
                    v["values"].clone(),
                )
            })
            .collect()
    })
}

fn replies(gw: &Gateway) -> Vec<String> {
    gw.outbox.peek(|o| {
        o.iter()
            .filter(|m| m.kind == protocol::KIND_REPLY)
            .map(|m| m.body.clone())
            .collect()
    })
}

fn level(l: u8, cause: &str) -> serde_json::Value {
    json!({"level": l, "cause": cause})
}

/// Start: one reading per output with the level read after open (a kept output: its pin's
/// level). Then a command's change, a pulse and its end at shutdown, each a reading with its
/// seq, and the shutdown one is in the spool when the gateway has stopped; a command during
/// the shutdown flush is refused.
#[test]
fn outputs_report_start_commands_and_pulse_ends() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gpio27"), "1\n").unwrap();
    let (_ev, mut gw) = gateway(dir.path());
    let r = readings(&gw);
    assert_eq!(
        r,
        vec![
            (1, "relay1".into(), level(1, "start")),
            (2, "relay2".into(), level(1, "start")),
        ]
    );
    let now = Instant::now();
    gw.on_command(
        br#"{"id":"c-1","target":"relay1","action":"set","value":1}"#,
        now,
    );
    gw.on_command(
        br#"{"id":"c-2","target":"relay1","action":"set","value":0}"#,
        now,
    );
    gw.on_command(
        br#"{"id":"c-3","target":"relay2","action":"pulse","value":{"ms":5000}}"#,
        now,
    );
    gw.apply_effects();
    let r = readings(&gw);
    assert_eq!(
        r[2..],
        [
            (3, "relay1".into(), level(0, "command")),
            (4, "relay2".into(), level(0, "command")),
        ],
        "set 1 on a pin at 1 is not a change"
    );
    gw.begin_shutdown();
    assert_eq!(read_pin_file(dir.path(), 22).unwrap(), Some(Level::High));
    assert_eq!(
        readings(&gw)[4],
        (5, "relay2".into(), level(1, "pulse_end"))
    );
    // A command during the flush is refused (it could not run its course) and changes
    // nothing.
    gw.on_command(
        br#"{"id":"c-4","target":"relay1","action":"pulse","value":{"ms":5000}}"#,
        now,
    );
    gw.apply_effects();
    assert_eq!(read_pin_file(dir.path(), 27).unwrap(), Some(Level::Low));
    assert_eq!(readings(&gw).len(), 5);
    let refused = gw.outbox.peek(|o| {
        o.iter()
            .any(|m| m.kind == protocol::KIND_REPLY && m.body.contains("shutting down"))
    });
    assert!(refused);
    gw.finish();
    drop(gw);
    let (mut spool, _) = Spool::open(&dir.path().join("spool"), Default::default()).unwrap();
    let mut batch = Vec::new();
    spool.read_from(5, 10, &mut batch).unwrap();
    let got: Vec<_> = batch
        .iter()
        .map(|(seq, body)| {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            (
                *seq,
                v["source"].as_str().unwrap().to_string(),
                v["values"].clone(),
            )
        })
        .collect();
    assert_eq!(got, vec![(5, "relay2".into(), level(1, "pulse_end")),]);
}

/// A command answered before a restart is answered the same way after it and not executed
/// again (the pin keeps the level it was given meanwhile); another command under its id is
/// refused.
#[test]
fn command_ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let toggle = br#"{"id":"d-1","target":"relay1","action":"toggle"}"#;
    let first = {
        let (_ev, mut gw) = gateway(dir.path());
        gw.on_command(toggle, Instant::now());
        gw.apply_effects();
        assert_eq!(read_pin_file(dir.path(), 27).unwrap(), Some(Level::High));
        gw.begin_shutdown();
        gw.finish();
        replies(&gw)
    };
    assert_eq!(first, vec![r#"{"id":"d-1","ok":true}"#.to_string()]);
    std::fs::write(dir.path().join("gpio27"), "0\n").unwrap();
    let (_ev, mut gw) = gateway(dir.path());
    gw.on_command(toggle, Instant::now());
    gw.apply_effects();
    assert_eq!(
        read_pin_file(dir.path(), 27).unwrap(),
        Some(Level::Low),
        "not toggled again"
    );
    assert_eq!(replies(&gw), first, "the original reply");
    gw.on_command(
        br#"{"id":"d-1","target":"relay1","action":"set","value":1}"#,
        Instant::now(),
    );
    gw.apply_effects();
    let r = replies(&gw);
    assert!(r[1].contains("reused with a different command"), "{r:?}");
    assert_eq!(read_pin_file(dir.path(), 27).unwrap(), Some(Level::Low));
    assert_eq!((gw.commands.ok, gw.commands.failed), (0, 1));
}
