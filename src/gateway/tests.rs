//! Interpreter tests: a real loop, spool and simulated GPIO, no backend.

use super::*;
use calloop::ping::{make_ping, PingSource};
use calloop::{EventSource, Poll, PostAction, Readiness, Token, TokenFactory};

fn test_gateway(dir: &std::path::Path) -> (EventLoop<'static, Gateway>, Gateway) {
    let text = format!(
        "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
         [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
         [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
         [[gpio.output]]\nname = \"relay1\"\npin = 27\n",
        dir.display()
    );
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let ev = EventLoop::try_new().unwrap();
    let gw = Gateway::new(cfg, &ev).unwrap();
    (ev, gw)
}

fn replies(gw: &Gateway) -> Vec<String> {
    gw.outbox.peek(|o| {
        o.iter()
            .filter(|m| m.kind == protocol::KIND_REPLY)
            .map(|m| m.body.clone())
            .collect()
    })
}

/// Through the interpreter: a repeated id drives the pin once and is answered as before.
#[test]
fn duplicate_commands_drive_the_pin_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_ev, mut gw) = test_gateway(dir.path());
    let now = Instant::now();
    let toggle = br#"{"id":"c-1","target":"relay1","action":"toggle"}"#;
    gw.on_command(toggle, now);
    gw.on_command(toggle, now);
    gw.apply_effects();
    assert_eq!(
        crate::hw::sim::read_pin_file(dir.path(), 27).unwrap(),
        Some(crate::hw::Level::High)
    );
    let r = replies(&gw);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0], r[1]);
    assert_eq!((gw.commands.ok, gw.commands.failed), (1, 0));
}

/// A source whose dispatch fails with a cause of its own.
struct Failing(PingSource);

#[derive(Debug, thiserror::Error)]
#[error("sensor bus wedged (test cause)")]
struct TestCause;

impl EventSource for Failing {
    type Event = ();
    type Metadata = ();
    type Ret = ();
    type Error = TestCause;

    fn process_events<F>(&mut self, r: Readiness, t: Token, _: F) -> Result<PostAction, TestCause>
    where
        F: FnMut((), &mut ()),
    {
        let _ = self.0.process_events(r, t, |_, _| {});
        Err(TestCause)
    }
    fn register(&mut self, p: &mut Poll, f: &mut TokenFactory) -> calloop::Result<()> {
        self.0.register(p, f)
    }
    fn reregister(&mut self, p: &mut Poll, f: &mut TokenFactory) -> calloop::Result<()> {
        self.0.reregister(p, f)
    }
    fn unregister(&mut self, p: &mut Poll) -> calloop::Result<()> {
        self.0.unregister(p)
    }
}

/// A failing source stops the loop with a typed error that carries its cause, and the
/// spool state (acks) is written on the way out.
#[test]
fn source_error_keeps_its_cause_and_flushes_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ev, mut gw) = test_gateway(dir.path());
    let now = Instant::now();
    let values = Values::single("t", &json!(1));
    for _ in 0..5 {
        gw.emit_reading("s", &values, now);
    }
    gw.on_ack(3, now);
    let (ping, source) = make_ping().unwrap();
    ev.handle()
        .insert_source(Failing(source), |_, _, _| {})
        .unwrap();
    ping.ping();
    let err = gw
        .drive(&mut ev)
        .expect_err("the failing source ends the loop");
    assert!(matches!(err, GatewayError::Loop { .. }), "{err:?}");
    let text = chain(&err);
    assert!(text.contains("sensor bus wedged"), "{text}");
    drop(gw);
    drop(ev);
    let spool_dir = dir.path().join("spool");
    let (spool, _) = Spool::open(&spool_dir, Default::default()).unwrap();
    assert_eq!(spool.acked(), 3, "acks written at exit");
    assert_eq!(spool.first_unacked(), Some(4));
}

/// Delivery through the interpreter: readings go straight into the outbox while nothing
/// waits, and a rewind (a connection) queues the unacked ones again from the spool, in order.
#[test]
fn readings_reach_the_outbox_and_rewind_from_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let (_ev, mut gw) = test_gateway(dir.path());
    let now = Instant::now();
    // seq 1 is relay1's start reading.
    for i in 0..4 {
        gw.emit_reading("s", &Values::single("n", &json!(i)), now);
    }
    let readings = |gw: &Gateway| -> Vec<String> {
        gw.outbox.peek(|o| {
            o.iter()
                .filter(|m| m.kind == protocol::KIND_READING)
                .map(|m| m.body.clone())
                .collect()
        })
    };
    assert_eq!(readings(&gw).len(), 5);
    assert_eq!(gw.delivery.next_send(), 6);
    gw.on_ack(3, now);
    gw.on_zmq(ZmqEvent::Connected);
    let r = readings(&gw);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(
        r[0].contains("\"seq\":4") && r[1].contains("\"seq\":5"),
        "{r:?}"
    );
    let first = gw.outbox.peek(|o| o.iter().next().map(|m| m.kind));
    assert_eq!(first, Some(protocol::KIND_HELLO));
    assert!(!gw.timers.contains_key(&TimerId::ConnCheck));
}

/// Shutdown restores a pulsing output at once (the pin is written, the timer cancelled) and
/// refuses a pulse during the flush; the exit path (also taken when the loop stops on an
/// error, without a shutdown) restores a running pulse.
#[test]
fn shutdown_ends_running_pulses() {
    let dir = tempfile::tempdir().unwrap();
    let (_ev, mut gw) = test_gateway(dir.path());
    let pin = || crate::hw::sim::read_pin_file(dir.path(), 27).unwrap();
    let pulse = |id: &str| {
        format!(r#"{{"id":"{id}","target":"relay1","action":"pulse","value":{{"ms":1000}}}}"#)
    };
    gw.on_command(pulse("p-1").as_bytes(), Instant::now());
    gw.apply_effects();
    assert_eq!(pin(), Some(crate::hw::Level::High));
    assert!(gw.timers.contains_key(&TimerId::Pulse(0)));
    gw.begin_shutdown();
    assert_eq!(pin(), Some(crate::hw::Level::Low), "restored at once");
    assert!(!gw.timers.contains_key(&TimerId::Pulse(0)));
    assert_eq!(gw.outputs.get(0).unwrap().pulse, None);

    gw.on_command(pulse("p-2").as_bytes(), Instant::now());
    gw.apply_effects();
    assert_eq!(
        pin(),
        Some(crate::hw::Level::Low),
        "refused during the flush"
    );
    gw.finish();
    drop(gw);

    let (_ev, mut gw) = test_gateway(dir.path());
    gw.on_command(pulse("p-3").as_bytes(), Instant::now());
    gw.apply_effects();
    assert_eq!(pin(), Some(crate::hw::Level::High));
    gw.finish();
    assert_eq!(
        pin(),
        Some(crate::hw::Level::Low),
        "restored on the way out"
    );
}

/// `fsync = "always"` with the disk stalled in an `fdatasync`: readings are stored but not
/// queued (durable, then sent), while a command is executed and answered at once; when the
/// sync returns, the loop is woken and queues the readings in order.
#[test]
fn fsync_always_queues_readings_after_their_sync_and_commands_do_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
         [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
         [spool]\nfsync = \"always\"\n\
         [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n\
         [[gpio.output]]\nname = \"relay1\"\npin = 27\n",
        dir.path().display()
    );
    let cfg = Config::parse(&text, "t.toml").unwrap();
    let mut ev = EventLoop::try_new().unwrap();
    let mut gw = Gateway::new(cfg, &ev).unwrap();
    let readings = |gw: &Gateway| -> Vec<String> {
        gw.outbox.peek(|o| {
            o.iter()
                .filter(|m| m.kind == protocol::KIND_READING)
                .map(|m| m.body.clone())
                .collect()
        })
    };
    // relay1's start reading (seq 1) is durable and queued once the loop has run.
    gw.spool.wait_for_deletions();
    ev.dispatch(Some(Duration::ZERO), &mut gw).unwrap();
    assert_eq!(readings(&gw).len(), 1);

    let hold = gw.spool.hold_helper();
    let now = Instant::now();
    for i in 0..3 {
        gw.emit_reading("s", &Values::single("n", &json!(i)), now);
    }
    ev.dispatch(Some(Duration::from_millis(20)), &mut gw)
        .unwrap();
    assert_eq!(readings(&gw).len(), 1, "not synced: not queued");
    assert_eq!(gw.spool.next_seq(), 5, "stored");

    gw.on_command(
        br#"{"id":"c-1","target":"relay1","action":"set","value":1}"#,
        now,
    );
    gw.apply_effects();
    assert_eq!(
        crate::hw::sim::read_pin_file(dir.path(), 27).unwrap(),
        Some(crate::hw::Level::High),
        "the command did not wait for the disk"
    );
    assert_eq!(replies(&gw).len(), 1);

    drop(hold);
    gw.spool.wait_for_deletions();
    ev.dispatch(Some(Duration::from_millis(100)), &mut gw)
        .unwrap();
    let r = readings(&gw);
    // seqs 2..4, then the output's level reading the command caused (seq 5).
    assert!(r.len() >= 4, "{r:?}");
    for (i, seq) in (1..=4).enumerate() {
        assert!(r[i].contains(&format!("\"seq\":{seq}")), "{r:?}");
    }
}
