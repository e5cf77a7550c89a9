//! The reload plan, without a loop: what is applied, what is refused.

use super::*;
use crate::config::{InputLineEnding, Level};

const BASE: &str = r#"
[gateway]
id = "gw-01"
data_dir = "/tmp/zgate"
stats_interval_s = 30

[backend]
endpoint = "tcp://127.0.0.1:5555"

[gpio]
backend = "sim"
sim_dir = "/tmp/sim"

[[gpio.input]]
name = "door"
pin = 17
pull = "up"

[[gpio.output]]
name = "relay1"
pin = 27

[[gpio.output]]
name = "relay2"
pin = 22
initial = 1

[[serial]]
name = "weather"
path = "/dev/ttyUSB0"

[[serial]]
name = "meter"
path = "/dev/ttyUSB1"
"#;

fn cfg(text: &str) -> Config {
    Config::parse(text, "t.toml").unwrap()
}

fn plan(new: &str) -> ReloadPlan {
    ReloadPlan::new(&cfg(BASE), cfg(new))
}

#[test]
fn same_file_changes_nothing() {
    let p = plan(BASE);
    assert!(!p.changes_anything());
    assert!(p.refused.is_empty());
    assert_eq!(p.config, cfg(BASE));
    assert_eq!(p.serial.unchanged, vec![(0, 0), (1, 1)]);
    assert_eq!(p.outputs.unchanged, vec![(0, 0), (1, 1)]);
    assert!(p
        .summary()
        .contains("serial_added=0 serial_removed=0 serial_changed=0"));
    assert!(p.summary().ends_with("refused=0"), "{}", p.summary());
}

#[test]
fn serial_ports_added_removed_changed() {
    let new = BASE
        .replace(
            "path = \"/dev/ttyUSB0\"",
            "path = \"/dev/ttyUSB0\"\nbaud = 19200\ninput_line_ending = \"cr\"\nwrite_timeout_ms = 500",
        )
        .replace(
            "name = \"meter\"\npath = \"/dev/ttyUSB1\"",
            "name = \"console\"\npath = \"/dev/ttyUSB2\"",
        );
    let p = plan(&new);
    assert!(p.changes_anything());
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert_eq!(p.serial.changed, vec![(0, 0)]);
    assert_eq!(p.serial.removed, vec![1], "meter");
    assert_eq!(p.serial.added, vec![1], "console");
    let w = &p.config.serial[0];
    assert_eq!(
        (w.baud, w.input_line_ending, w.write_timeout_ms),
        (19200, InputLineEnding::Cr, 500)
    );
    assert!(!p.gpio_changed);
    assert!(
        p.summary()
            .starts_with("serial_added=1 serial_removed=1 serial_changed=1 inputs_added=0"),
        "{}",
        p.summary()
    );
}

/// Inputs and outputs match by name and pin: a new pin is a removal and an addition. Kept
/// outputs open with `initial = "keep"`; a new output keeps its configured `initial`.
#[test]
fn gpio_changes_and_kept_outputs_open_with_keep() {
    let new = BASE
        .replace(
            "[[gpio.output]]\nname = \"relay1\"",
            "[[gpio.input]]\nname = \"window\"\npin = 18\n\n[[gpio.output]]\nname = \"relay1\"",
        )
        .replace(
            "name = \"relay2\"\npin = 22\ninitial = 1",
            "name = \"relay2\"\npin = 23\ninitial = 1",
        )
        .replace("pin = 27", "pin = 27\nmax_pulse_ms = 500")
        + "\n[[gpio.output]]\nname = \"siren\"\npin = 5\ninitial = 1\n";
    let p = plan(&new);
    assert!(p.gpio_changed);
    assert_eq!(p.inputs.unchanged, vec![(0, 0)]);
    assert_eq!(p.inputs.added, vec![1]);
    assert_eq!(p.outputs.changed, vec![(0, 0)], "relay1: max_pulse_ms");
    assert_eq!(p.outputs.removed, vec![1], "relay2 on its old pin");
    assert_eq!(p.outputs.added, vec![1, 2], "relay2 on 23, siren");
    let open = p.gpio_to_open();
    let initial: Vec<(&str, Initial)> = open
        .output
        .iter()
        .map(|o| (o.name.as_str(), o.initial))
        .collect();
    assert_eq!(
        initial,
        vec![
            ("relay1", Initial::Keep),
            ("relay2", Initial::Drive(Level::High)),
            ("siren", Initial::Drive(Level::High)),
        ]
    );
    // The configuration in force keeps what the file says.
    assert_eq!(p.config.gpio.output[0].initial, Initial::Drive(Level::Low));
    let s = p.summary();
    assert!(
        s.contains("inputs_added=1 inputs_removed=0 inputs_changed=0 outputs_added=2 outputs_removed=1 outputs_changed=1"),
        "{s}"
    );
}

#[test]
fn live_scalars_are_applied() {
    let new = BASE.replace("stats_interval_s = 30", "stats_interval_s = 5")
        + "\n[commands]\nmax_per_s = 7\n";
    let new = new.replace(
        "endpoint = \"tcp://127.0.0.1:5555\"",
        "endpoint = \"tcp://127.0.0.1:5555\"\nshutdown_flush_ms = 100",
    );
    let p = plan(&new);
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert!(p.commands_changed && p.stats_interval_changed && p.shutdown_flush_changed);
    assert_eq!(p.config.commands.max_per_s, 7);
    assert_eq!(p.config.gateway.stats_interval_s, 5);
    assert_eq!(p.config.backend.shutdown_flush_ms, 100);
    assert!(p.changes_anything());
    let s = p.summary();
    assert!(
        s.contains("commands_max_per_s=7(new) stats_interval_s=5(new) shutdown_flush_ms=100(new)"),
        "{s}"
    );
}

/// Keys that need a restart are named, kept at their running value, and the rest of the
/// file still applies.
#[test]
fn restart_keys_are_refused_and_the_rest_applies() {
    let new = BASE
        .replace("id = \"gw-01\"", "id = \"gw-02\"")
        .replace("data_dir = \"/tmp/zgate\"", "data_dir = \"/tmp/other\"")
        .replace(
            "endpoint = \"tcp://127.0.0.1:5555\"",
            "endpoint = \"tcp://127.0.0.1:6666\"\noutbox_max = 5\nmax_msg_size = 2048\nhello_timeout_s = 3",
        )
        .replace("sim_dir = \"/tmp/sim\"", "sim_dir = \"/tmp/sim2\"")
        .replace("stats_interval_s = 30", "stats_interval_s = 3")
        + "\n[spool]\nmax_bytes = 1048576\nwhen_full = \"drop_newest\"\nretransmit_s = 3\n";
    let p = plan(&new);
    let keys: Vec<&str> = p.refused.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "gateway.id",
            "gateway.data_dir",
            "backend.endpoint",
            "backend.outbox_max",
            "backend.max_msg_size",
            "backend.hello_timeout_s",
            "spool.max_bytes",
            "spool.when_full",
            "spool.retransmit_s",
            "gpio.sim_dir",
        ]
    );
    let base = cfg(BASE);
    assert_eq!(p.config.gateway.id, "gw-01");
    assert_eq!(p.config.gateway.data_dir, base.gateway.data_dir);
    assert_eq!(p.config.backend, base.backend);
    assert_eq!(p.config.spool, base.spool);
    assert_eq!(p.config.gpio, base.gpio);
    assert!(!p.gpio_changed, "a refused sim_dir reopens nothing");
    // The live key in the same file is applied.
    assert!(p.stats_interval_changed);
    assert_eq!(p.config.gateway.stats_interval_s, 3);
    assert_eq!(
        p.refused[2].to_string(),
        "key=backend.endpoint running=\"tcp://127.0.0.1:5555\" file=\"tcp://127.0.0.1:6666\""
    );
    assert!(p.summary().ends_with("refused=10"), "{}", p.summary());
}

#[test]
fn curve_keys_are_refused() {
    let key = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";
    let new = BASE.replace(
        "endpoint = \"tcp://127.0.0.1:5555\"",
        &format!(
            "endpoint = \"tcp://127.0.0.1:5555\"\nserver_public_key = \"{key}\"\nsecret_key_file = \"/etc/zgate/gw.key\"\ninsecure = true"
        ),
    );
    let p = plan(&new);
    let keys: Vec<&str> = p.refused.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "backend.server_public_key",
            "backend.secret_key_file",
            "backend.insecure"
        ]
    );
    assert!(!p.config.backend.curve());
    assert!(!p.changes_anything());
    assert_eq!(
        p.refused[1].to_string(),
        "key=backend.secret_key_file running=unset file=\"/etc/zgate/gw.key\""
    );
}

// ---- Through the interpreter: a real loop, spool and simulated GPIO, no backend.

use crate::gateway::{Gateway, TimerId};
use crate::hw::sim::read_pin_file;
use calloop::EventLoop;
use std::path::Path;
use std::time::Instant;

fn gpio_config(dir: &Path, body: &str) -> String {
    format!(
        "[gateway]\nid = \"gw-t\"\ndata_dir = \"{0}\"\n\
         [backend]\nendpoint = \"tcp://127.0.0.1:1\"\n\
         [gpio]\nbackend = \"sim\"\nsim_dir = \"{0}\"\n{body}",
        dir.display()
    )
}

const TWO_RELAYS: &str = "[[gpio.output]]\nname = \"relay1\"\npin = 27\n\
                          [[gpio.output]]\nname = \"relay2\"\npin = 22\n";

fn start(dir: &Path, body: &str) -> (EventLoop<'static, Gateway>, Gateway) {
    let ev = EventLoop::try_new().unwrap();
    let mut gw = Gateway::new(
        Config::parse(&gpio_config(dir, body), "t.toml").unwrap(),
        &ev,
    )
    .unwrap();
    let path = dir.join("zgate.toml");
    std::fs::write(&path, gpio_config(dir, body)).unwrap();
    gw.set_config_file(path);
    (ev, gw)
}

fn pin(dir: &Path, n: u8) -> Option<Level> {
    read_pin_file(dir, n).unwrap()
}

/// A kept output keeps its level and its running pulse (re-armed under its new index); a
/// removed output's pulse ends first; a new input is read; `initial` of a kept output is not
/// driven again.
#[test]
fn reload_keeps_kept_outputs_and_ends_pulses_of_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_ev, mut gw) = start(d, TWO_RELAYS);
    let now = Instant::now();
    gw.on_command(
        br#"{"id":"c-1","target":"relay1","action":"pulse","value":{"ms":9000}}"#,
        now,
    );
    gw.on_command(
        br#"{"id":"c-2","target":"relay2","action":"pulse","value":{"ms":9000}}"#,
        now,
    );
    gw.apply_effects();
    assert_eq!(
        (pin(d, 27), pin(d, 22)),
        (Some(Level::High), Some(Level::High))
    );
    let until = gw.outputs.get(0).unwrap().pulse.unwrap().until;

    // relay2 goes, relay1 moves to index 1 (with initial = 0, which must not be driven), a
    // new input appears.
    std::fs::write(d.join("gpio18"), "0\n").unwrap();
    let body = "[[gpio.input]]\nname = \"window\"\npin = 18\npull = \"up\"\n\
                [[gpio.output]]\nname = \"siren\"\npin = 5\ninitial = 1\n\
                [[gpio.output]]\nname = \"relay1\"\npin = 27\ninitial = 0\n";
    std::fs::write(d.join("zgate.toml"), gpio_config(d, body)).unwrap();
    gw.reload();

    assert_eq!(
        pin(d, 22),
        Some(Level::Low),
        "removed relay2: pulse ended, restored"
    );
    assert_eq!(pin(d, 27), Some(Level::High), "kept relay1: still pulsing");
    assert_eq!(pin(d, 5), Some(Level::High), "new siren: initial driven");
    let relay1 = gw.outputs.get(1).unwrap();
    assert_eq!(relay1.name, "relay1");
    assert_eq!(relay1.level, Level::High);
    assert_eq!(relay1.pulse.map(|p| p.until), Some(until));
    assert!(gw.timers.contains_key(&TimerId::Pulse(1)));
    assert!(!gw.timers.contains_key(&TimerId::Pulse(0)));
    assert_eq!(
        gw.inputs.get(0).map(|i| (i.name.as_str(), i.level)),
        Some(("window", Level::Low))
    );
    assert_eq!(gw.config().gpio.output.len(), 2);
    assert!(gw.outputs.find("relay2").is_none());

    // The pulse still ends at its deadline, under the new index.
    gw.outputs.pulse_due(1, until, &mut gw.fx);
    gw.apply_effects();
    assert_eq!(pin(d, 27), Some(Level::Low));
    // Commands reach the reopened backend.
    gw.on_command(
        br#"{"id":"c-3","target":"siren","action":"set","value":0}"#,
        now,
    );
    gw.apply_effects();
    assert_eq!(pin(d, 5), Some(Level::Low));
}

/// An invalid file changes nothing; a refused key is kept while the rest applies.
#[test]
fn invalid_file_keeps_the_running_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_ev, mut gw) = start(d, TWO_RELAYS);
    let before = gw.config().clone();
    std::fs::write(
        d.join("zgate.toml"),
        gpio_config(d, "[[gpio.output]]\nname = 1\n"),
    )
    .unwrap();
    gw.reload();
    assert_eq!(*gw.config(), before);

    let text = gpio_config(d, TWO_RELAYS).replace("id = \"gw-t\"", "id = \"gw-other\"")
        + "[commands]\nmax_per_s = 3\n";
    std::fs::write(d.join("zgate.toml"), text).unwrap();
    gw.reload();
    assert_eq!(gw.config().gateway.id, "gw-t");
    assert_eq!(gw.config().commands.max_per_s, 3);
    let now = Instant::now();
    for i in 0..4 {
        let cmd = format!(r#"{{"id":"r-{i}","target":"relay1","action":"toggle"}}"#);
        gw.on_command(cmd.as_bytes(), now);
    }
    assert_eq!(
        (gw.commands.ok, gw.commands.failed),
        (3, 1),
        "the new rate limit"
    );
}

/// A `[gpio]` that cannot be opened (here a pin file that holds no level) leaves the running
/// `[gpio]` in force, reopened with its outputs kept; the rest of the file still applies.
#[test]
fn unopenable_gpio_keeps_the_running_gpio() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_ev, mut gw) = start(d, TWO_RELAYS);
    let now = Instant::now();
    gw.on_command(
        br#"{"id":"c-1","target":"relay1","action":"set","value":1}"#,
        now,
    );
    gw.apply_effects();
    std::fs::write(d.join("gpio19"), "x\n").unwrap();
    let body = format!("{TWO_RELAYS}[[gpio.input]]\nname = \"bad\"\npin = 19\n");
    let text = gpio_config(d, &body) + "[commands]\nmax_per_s = 4\n";
    std::fs::write(d.join("zgate.toml"), text).unwrap();
    let before = gw.config().gpio.clone();
    gw.reload();
    assert_eq!(gw.config().gpio, before);
    assert_eq!(gw.config().commands.max_per_s, 4);
    assert!(gw.inputs.get(0).is_none());
    assert_eq!(pin(d, 27), Some(Level::High), "relay1 kept its level");
    assert_eq!(gw.outputs.get(0).map(|o| o.level), Some(Level::High));
    gw.on_command(
        br#"{"id":"c-2","target":"relay2","action":"set","value":1}"#,
        now,
    );
    gw.apply_effects();
    assert_eq!(
        pin(d, 22),
        Some(Level::High),
        "the reopened backend drives outputs"
    );
}
