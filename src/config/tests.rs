//! Config parsing and validation tests.

use super::locate::locate;
use super::*;

const GOOD: &str = r#"
[gateway]
id = "gw-01"
data_dir = "/tmp/zgate"

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

[[serial]]
name = "weather"
path = "/dev/ttyUSB0"
"#;

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(GOOD, "t.toml").unwrap();
    assert_eq!(c.gateway.id, "gw-01");
    assert_eq!(c.gateway.stats_interval_s, 30);
    assert_eq!(c.backend.outbox_max, 10_000);
    assert_eq!(c.backend.shutdown_flush_ms, 2000);
    assert_eq!(c.gpio.backend, GpioBackendKind::Sim);
    assert_eq!(c.gpio.input[0].edge, Edge::Both);
    assert_eq!(c.gpio.input[0].debounce_ms, 20);
    assert_eq!(c.gpio.output[0].max_pulse_ms, 10_000);
    assert_eq!(c.serial[0].baud, 9600);
    assert_eq!(c.serial[0].format, LineFormat::Kv);
    assert_eq!(c.serial[0].line_ending, "\n");
    assert_eq!(c.serial[0].input_line_ending, InputLineEnding::Auto);
    assert_eq!(c.serial[0].write_timeout_ms, 2000);
}

#[test]
fn serial_input_line_ending_and_write_timeout() {
    for (text, want) in [
        ("auto", InputLineEnding::Auto),
        ("lf", InputLineEnding::Lf),
        ("cr", InputLineEnding::Cr),
        ("crlf", InputLineEnding::Crlf),
    ] {
        let t = GOOD.replace(
            "path = \"/dev/ttyUSB0\"",
            &format!(
                "path = \"/dev/ttyUSB0\"\ninput_line_ending = \"{text}\"\nwrite_timeout_ms = 500"
            ),
        );
        let c = Config::parse(&t, "z.toml").unwrap();
        assert_eq!(c.serial[0].input_line_ending, want);
        assert_eq!(c.serial[0].write_timeout_ms, 500);
    }
    let t = GOOD.replace(
        "path = \"/dev/ttyUSB0\"",
        "path = \"/dev/ttyUSB0\"\ninput_line_ending = \"lfcr\"",
    );
    let e = Config::parse(&t, "z.toml").unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.key.as_str()),
        ("z.toml", 25, "serial.input_line_ending"),
        "{e}"
    );
    assert!(e.message.contains("crlf"), "{e}");
    for bad in ["0", "5", "600001"] {
        let t = GOOD.replace(
            "path = \"/dev/ttyUSB0\"",
            &format!("path = \"/dev/ttyUSB0\"\nwrite_timeout_ms = {bad}"),
        );
        let e = Config::parse(&t, "z.toml").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (25, "serial.write_timeout_ms"),
            "{e}"
        );
    }
    let t = GOOD.replace(
        "path = \"/dev/ttyUSB0\"",
        "path = \"/dev/ttyUSB0\"\nbaud = 12345",
    );
    let e = Config::parse(&t, "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (25, "serial.baud"), "{e}");
}

#[test]
fn template_is_valid() {
    Config::parse(TEMPLATE, "template").unwrap();
}

#[test]
fn unknown_key_names_file_line_key() {
    let text = GOOD.replace("pin = 27", "pin = 27\npinn = 3");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert_eq!(e.file, "z.toml");
    assert_eq!(e.line, 21, "{e}");
    assert_eq!(e.key, "gpio.output.pinn", "{e}");
    assert!(
        e.to_string()
            .starts_with("z.toml:21: key gpio.output.pinn:"),
        "{e}"
    );
}

#[test]
fn wrong_type_names_line_and_key() {
    let text = GOOD.replace("pin = 17", "pin = \"seventeen\"");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert_eq!(e.line, 15, "{e}");
    assert_eq!(e.key, "gpio.input.pin", "{e}");
}

#[test]
fn bad_enum_value() {
    let text = GOOD.replace("pull = \"up\"", "pull = \"sideways\"");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert_eq!(e.line, 16, "{e}");
    assert_eq!(e.key, "gpio.input.pull");
}

#[test]
fn missing_id() {
    let text = GOOD.replace("id = \"gw-01\"", "");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert!(e.message.contains("missing field"), "{e}");
    assert!(e.key.ends_with("id"), "{e}");
}

#[test]
fn duplicate_name_and_pin() {
    let text = GOOD.replace("name = \"relay1\"", "name = \"door\"");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (19, "gpio.output.name"), "{e}");
    let text = GOOD.replace("pin = 27", "pin = 17");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (20, "gpio.output.pin"), "{e}");
    let text = GOOD.replace("name = \"weather\"", "name = \"relay1\"");
    let e = Config::parse(&text, "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (23, "serial.name"), "{e}");
}

#[test]
fn hello_timeout_s_is_checked_with_its_line() {
    let with = |v: &str| {
        GOOD.replace(
            "endpoint = \"tcp://127.0.0.1:5555\"",
            &format!("endpoint = \"tcp://127.0.0.1:5555\"\nhello_timeout_s = {v}"),
        )
    };
    assert_eq!(
        Config::parse(&with("2"), "z.toml")
            .unwrap()
            .backend
            .hello_timeout_s,
        2
    );
    for bad in ["0", "3601"] {
        let e = Config::parse(&with(bad), "z.toml").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (8, "backend.hello_timeout_s"),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("z.toml:8: key backend.hello_timeout_s:"),
            "{e}"
        );
    }
    let e = Config::parse(&with("-1"), "z.toml").unwrap_err();
    assert!(e.key.ends_with("hello_timeout_s"), "{e}");
}

#[test]
fn range_checks() {
    for (from, to, key) in [
        ("pin = 27", "pin = 40", "gpio.output.pin"),
        ("pin = 27", "pin = 27\ninitial = 2", "gpio.output.initial"),
        (
            "endpoint = \"tcp://127.0.0.1:5555\"",
            "endpoint = \"http://x\"",
            "backend.endpoint",
        ),
        ("id = \"gw-01\"", "id = \"gw 01\"", "gateway.id"),
    ] {
        let e = Config::parse(&GOOD.replace(from, to), "z.toml").unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.line > 0, "{e}");
    }
}

/// `initial` takes 0, 1 or "keep"; anything else names file, line and key.
#[test]
fn output_initial_values() {
    let with = |v: &str| GOOD.replace("pin = 27", &format!("pin = 27\ninitial = {v}"));
    let c = Config::parse(&with("\"keep\""), "z.toml").unwrap();
    assert_eq!(c.gpio.output[0].initial, Initial::Keep);
    let c = Config::parse(&with("1"), "z.toml").unwrap();
    assert_eq!(c.gpio.output[0].initial, Initial::Drive(Level::High));
    let c = Config::parse(GOOD, "z.toml").unwrap();
    assert_eq!(c.gpio.output[0].initial, Initial::Drive(Level::Low));
    for bad in ["2", "\"on\"", "-1"] {
        let e = Config::parse(&with(bad), "z.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (21, "gpio.output.initial"), "{e}");
        assert!(
            e.to_string()
                .starts_with("z.toml:21: key gpio.output.initial:")
                && e.message.contains("0, 1 or \"keep\""),
            "{e}"
        );
    }
}

const KEY: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";

#[test]
fn security_keys_and_defaults() {
    let c = Config::parse(GOOD, "t.toml").unwrap();
    assert!(!c.backend.curve());
    assert!(!c.backend.insecure_link());
    assert_eq!(c.backend.max_msg_size, 65536);
    assert_eq!(c.backend.hello_timeout_s, 10);
    assert_eq!(c.commands.max_per_s, 20);
    assert!(!c.serial[0].allow_binary);
    let text = GOOD.replace(
        "endpoint = \"tcp://127.0.0.1:5555\"",
        &format!(
            "endpoint = \"tcp://192.0.2.1:5555\"\nserver_public_key = \"{KEY}\"\nsecret_key_file = \"/etc/zgate/gw.key\""
        ),
    ) + "\n[commands]\nmax_per_s = 5\n";
    let c = Config::parse(&text, "t.toml").unwrap();
    assert!(c.backend.curve());
    assert_eq!(c.commands.max_per_s, 5);
}

#[test]
fn non_loopback_plaintext_is_refused_unless_insecure() {
    let remote = GOOD.replace("tcp://127.0.0.1:5555", "tcp://192.0.2.1:5555");
    let e = Config::parse(&remote, "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (7, "backend.endpoint"), "{e}");
    assert!(e.message.contains("server_public_key"), "{e}");
    assert!(e.message.contains("insecure = true"), "{e}");
    let insecure = remote.replace(
        "endpoint = \"tcp://192.0.2.1:5555\"",
        "endpoint = \"tcp://192.0.2.1:5555\"\ninsecure = true",
    );
    let c = Config::parse(&insecure, "z.toml").unwrap();
    assert!(c.backend.insecure_link());
    for ep in ["tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x"] {
        Config::parse(&GOOD.replace("tcp://127.0.0.1:5555", ep), "z.toml").unwrap();
    }
}

#[test]
fn bad_curve_keys_name_line_and_key() {
    let bad = GOOD.replace(
        "endpoint = \"tcp://127.0.0.1:5555\"",
        "endpoint = \"tcp://127.0.0.1:5555\"\nserver_public_key = \"abc\"\nsecret_key_file = \"k\"",
    );
    let e = Config::parse(&bad, "z.toml").unwrap_err();
    assert_eq!(
        (e.line, e.key.as_str()),
        (8, "backend.server_public_key"),
        "{e}"
    );
    let bad = bad.replace("\"abc\"", &format!("\"{}~\"", &KEY[..39]));
    let e = Config::parse(&bad, "z.toml").unwrap_err();
    assert!(e.message.contains("Z85 alphabet"), "{e}");
    let half = GOOD.replace(
        "endpoint = \"tcp://127.0.0.1:5555\"",
        &format!("endpoint = \"tcp://127.0.0.1:5555\"\nserver_public_key = \"{KEY}\""),
    );
    let e = Config::parse(&half, "z.toml").unwrap_err();
    assert_eq!(e.key, "backend.secret_key_file", "{e}");
    let e = Config::parse(
        &(GOOD.to_string() + "[commands]\nmax_per_s = 0\n"),
        "z.toml",
    )
    .unwrap_err();
    assert_eq!(e.key, "commands.max_per_s", "{e}");
}

#[test]
fn locate_finds_nth_table() {
    let t = "[[a]]\nx = 1\n[[a]]\ny = 2\nx = 3\n";
    assert_eq!(locate(t, "a", Some(1), "x"), 5);
    assert_eq!(locate(t, "a", Some(1), "z"), 3);
    assert_eq!(locate(t, "b", None, "z"), 0);
}

fn cdev(gpio: &str) -> String {
    GOOD.replace("backend = \"sim\"", "backend = \"cdev\"")
        .replace("pin = 17", gpio)
}

/// `cdev` is the default backend, `chip` defaults to "auto", and a path picks a chip.
#[test]
fn gpio_backend_and_chip_defaults() {
    let c = Config::parse("[gateway]\nid = \"gw\"\n", "t.toml").unwrap();
    assert_eq!(c.gpio.backend, GpioBackendKind::Cdev);
    assert_eq!(c.gpio.chip, ChipSelect::Auto);
    let c = Config::parse(
        &GOOD.replace(
            "backend = \"sim\"",
            "backend = \"cdev\"\nchip = \"/dev/gpiochip4\"",
        ),
        "t.toml",
    )
    .unwrap();
    assert_eq!(
        c.gpio.chip,
        ChipSelect::Path(PathBuf::from("/dev/gpiochip4"))
    );
    let e = Config::parse(
        &GOOD.replace(
            "backend = \"sim\"",
            "backend = \"cdev\"\nchip = \"gpiochip4\"",
        ),
        "z.toml",
    )
    .unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (11, "gpio.chip"), "{e}");
    assert!(
        e.message.contains("\"auto\"") && e.message.contains("/dev/gpiochip0"),
        "{e}"
    );
}

/// An input or output may give `line` instead of `pin`: it is listed in `lines`, unresolved,
/// and skipped by the pin checks until it is looked up on the chip.
#[test]
fn line_instead_of_pin() {
    let text = cdev("line = \"GPIO17\"").replace("pin = 27", "line = \"GPIO27\"");
    let c = Config::parse(&text, "z.toml").unwrap();
    assert_eq!(
        c.gpio.lines,
        vec![
            NamedLine {
                kind: LineKind::Input,
                index: 0,
                name: "GPIO17".into(),
                resolved: None
            },
            NamedLine {
                kind: LineKind::Output,
                index: 0,
                name: "GPIO27".into(),
                resolved: None
            },
        ]
    );
    assert!(c.gpio.named(LineKind::Output, 0).is_some());
    assert!(c.gpio.named(LineKind::Output, 1).is_none());
    // A pin entry next to a named one keeps its pin.
    let c = Config::parse(&cdev("line = \"GPIO17\""), "z.toml").unwrap();
    assert_eq!(c.gpio.output[0].pin, 27);
    assert_eq!(c.gpio.lines.len(), 1);
}

/// Exactly one of `pin` and `line`; `line` only with cdev; errors name file, line and key.
#[test]
fn pin_or_line_errors_name_file_line_key() {
    let e = Config::parse(&cdev("pin = 17\nline = \"GPIO17\""), "z.toml").unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.key.as_str()),
        ("z.toml", 16, "gpio.input.line"),
        "{e}"
    );
    assert!(e.message.contains("not both"), "{e}");

    let e = Config::parse(&cdev("edge = \"rising\""), "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (13, "gpio.input.pin"), "{e}");
    assert!(e.message.contains("line (the line's name"), "{e}");

    let sim = GOOD.replace("pin = 27", "line = \"GPIO27\"");
    let e = Config::parse(&sim, "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (20, "gpio.output.line"), "{e}");
    assert!(
        e.message.contains("backend = \"cdev\"") && e.message.contains("\"sim\""),
        "{e}"
    );

    let e = Config::parse(&cdev("line = \"\""), "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (15, "gpio.input.line"), "{e}");
}

/// Offsets above the Pi header's BCM range are accepted only on a chip named by path.
#[test]
fn offsets_beyond_bcm_need_a_chip_path() {
    let e = Config::parse(&cdev("pin = 40"), "z.toml").unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (15, "gpio.input.pin"), "{e}");
    let text = cdev("pin = 40").replace(
        "backend = \"cdev\"",
        "backend = \"cdev\"\nchip = \"/dev/gpiochip1\"",
    );
    let c = Config::parse(&text, "z.toml").unwrap();
    assert_eq!(c.gpio.input[0].pin, 40);
}
