//! `[[modbus]]` parsing and validation tests.

use super::*;

const BUS: &str = r#"
[gateway]
id = "gw-01"

[[serial]]
name = "weather"
path = "/dev/ttyUSB0"

[[modbus]]
name = "bus1"
path = "/dev/ttyUSB1"

[[modbus.device]]
name = "meter1"
unit = 1

[[modbus.device.register]]
name = "voltage"
kind = "input"
address = 0
scale = 0.1

[[modbus.device.register]]
name = "energy"
kind = "holding"
address = 4
type = "u32"
word_order = "little"
writable = true

[[modbus.device]]
name = "relays"
unit = 2
poll_ms = 250

[[modbus.device.register]]
name = "k1"
kind = "coil"
address = 0
writable = true
"#;

fn err(text: &str) -> ConfigError {
    Config::parse(text, "m.toml").unwrap_err()
}

#[test]
fn modbus_parses_with_defaults() {
    let c = Config::parse(BUS, "m.toml").unwrap();
    let bus = &c.modbus[0];
    assert_eq!(
        (
            bus.baud,
            bus.parity,
            bus.stop_bits,
            bus.timeout_ms,
            bus.retries
        ),
        (9600, Parity::None, 1, 200, 1)
    );
    assert_eq!(bus.device[0].poll_ms, 1000);
    assert_eq!(bus.device[1].poll_ms, 250);
    let v = &bus.device[0].register[0];
    assert_eq!(v.value_type(), ValueType::U16);
    assert_eq!((v.scale, v.offset, v.writable), (0.1, 0.0, false));
    assert_eq!(bus.device[0].register[1].word_order, WordOrder::Little);
    assert_eq!(bus.device[1].register[0].value_type(), ValueType::Bool);
}

#[test]
fn modbus_unknown_keys_name_file_line_key() {
    let e = err(&BUS.replace("unit = 2", "unit = 2\ninterval_ms = 5"));
    assert_eq!(
        (e.line, e.key.as_str()),
        (34, "modbus.device.interval_ms"),
        "{e}"
    );
    let e = err(&BUS.replace("scale = 0.1", "scale = 0.1\nbits = 3"));
    assert_eq!(
        (e.line, e.key.as_str()),
        (22, "modbus.device.register.bits"),
        "{e}"
    );
    let e = err(&BUS.replace(
        "path = \"/dev/ttyUSB1\"",
        "path = \"/dev/ttyUSB1\"\nflow = 1",
    ));
    assert_eq!((e.line, e.key.as_str()), (12, "modbus.flow"), "{e}");
}

#[test]
fn modbus_checks_name_line_and_key() {
    for (from, to, line, key) in [
        ("unit = 2", "unit = 0", 33, "modbus.device.unit"),
        ("unit = 2", "unit = 248", 33, "modbus.device.unit"),
        ("unit = 2", "unit = 1", 33, "modbus.device.unit"),
        ("poll_ms = 250", "poll_ms = 5", 34, "modbus.device.poll_ms"),
        (
            "name = \"relays\"",
            "name = \"weather\"",
            32,
            "modbus.device.name",
        ),
        (
            "name = \"relays\"",
            "name = \"bus1\"",
            32,
            "modbus.device.name",
        ),
        (
            "name = \"k1\"",
            "name = \"k1\"\ntype = \"u16\"",
            38,
            "modbus.device.register.type",
        ),
        (
            "type = \"u32\"",
            "type = \"bool\"",
            27,
            "modbus.device.register.type",
        ),
        (
            "scale = 0.1",
            "scale = 0.1\nwritable = true",
            22,
            "modbus.device.register.writable",
        ),
        (
            "address = 4",
            "address = 65535",
            26,
            "modbus.device.register.address",
        ),
        (
            "name = \"energy\"",
            "name = \"voltage\"",
            24,
            "modbus.device.register.name",
        ),
        (
            "scale = 0.1",
            "scale = 0.0",
            21,
            "modbus.device.register.scale",
        ),
    ] {
        let text = BUS.replacen(from, to, 1);
        assert_ne!(text, BUS, "{from}");
        let e = err(&text);
        assert_eq!((e.line, e.key.as_str()), (line, key), "{from} -> {to}: {e}");
    }
    let bus_key = |from: &str, to: &str| {
        let e = err(&BUS.replacen(from, to, 1));
        (e.line, e.key)
    };
    let p = "path = \"/dev/ttyUSB1\"";
    assert_eq!(
        bus_key(p, "path = \"/dev/ttyUSB0\""),
        (11, "modbus.path".into())
    );
    for extra in [
        "baud = 1234",
        "stop_bits = 3",
        "timeout_ms = 5",
        "retries = 11",
    ] {
        let (line, key) = bus_key(p, &format!("{p}\n{extra}"));
        let want = format!("modbus.{}", extra.split(' ').next().unwrap());
        assert_eq!((line, key), (12, want), "{extra}");
    }
    let overlap = BUS.replace("kind = \"input\"", "kind = \"holding\"");
    let e = err(&overlap.replace("address = 4", "address = 0"));
    assert_eq!(
        (e.line, e.key.as_str()),
        (26, "modbus.device.register.address"),
        "{e}"
    );
    let e = err(&BUS
        .replace("parity = ", "x")
        .replace(p, &format!("{p}\nparity = \"mark\"")));
    assert_eq!(e.key, "modbus.parity", "{e}");
}

#[test]
fn modbus_devices_take_the_report_keys() {
    let c = Config::parse(
        &BUS.replace(
            "unit = 2",
            "unit = 2\nreport = \"on_change\"\ndeadband = 0.5\nmax_interval_s = 60",
        ),
        "t.toml",
    )
    .unwrap();
    let r = &c.modbus[0].device[1].report;
    assert_eq!(
        (r.report, r.deadband, r.max_interval_s),
        (ReportMode::OnChange, 0.5, 60)
    );
    let e = err(&BUS.replace("unit = 2", "unit = 2\ndeadband = 0.5"));
    assert_eq!(e.key.as_str(), "modbus.device.deadband", "{e}");
}
