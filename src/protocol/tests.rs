use super::*;

#[test]
fn kv_types() {
    let m = parse_kv("temperature=21.5 humidity=40,ok=true flag=false name=abc neg=-3").unwrap();
    assert_eq!(
        Value::Object(m.to_map()),
        json!({"temperature": 21.5, "humidity": 40, "ok": true, "flag": false, "name": "abc", "neg": -3})
    );
}

#[test]
fn kv_edge_cases() {
    assert_eq!(parse_kv("  ,, "), Err(LineError::Empty));
    assert!(matches!(parse_kv("a=1 b"), Err(LineError::NoEquals(_))));
    assert!(matches!(parse_kv("=1"), Err(LineError::EmptyKey(_))));
    assert!(matches!(
        parse_kv("a=1 a=2"),
        Err(LineError::DuplicateKey(_))
    ));
    let m = parse_kv("a= b=nan c=inf d=1e3 e=x=y").unwrap();
    assert_eq!(
        m.as_json(),
        r#"{"a":"","b":"nan","c":"inf","d":1000.0,"e":"x=y"}"#
    );
    assert_eq!(
        Value::Object(m.to_map()),
        json!({"a": "", "b": "nan", "c": "inf", "d": 1000.0, "e": "x=y"})
    );
}

#[test]
fn json_and_raw_lines() {
    let m = parse_line(LineFormat::Json, br#"{"t": 1, "s": "x"}"#).unwrap();
    assert_eq!(m.as_json(), r#"{"t":1,"s":"x"}"#);
    assert_eq!(
        parse_line(LineFormat::Json, b"[1,2]"),
        Err(LineError::NotObject)
    );
    assert!(matches!(
        parse_line(LineFormat::Json, b"{oops"),
        Err(LineError::Json(_))
    ));
    let m = parse_line(LineFormat::Raw, b"hello \"world\"\t\x01").unwrap();
    assert_eq!(
        Value::Object(m.to_map()),
        json!({"line": "hello \"world\"\t\u{1}"})
    );
    assert_eq!(
        parse_line(LineFormat::Raw, b"\xff\xfe"),
        Err(LineError::NotUtf8)
    );
}

#[test]
fn commands_parse() {
    let c = parse_command(br#"{"id":"c-1","target":"relay1","action":"set","value":1}"#).unwrap();
    assert_eq!(c.action, Action::Set(1));
    let c =
        parse_command(br#"{"id":"c-1","target":"relay1","action":"set","value":false}"#).unwrap();
    assert_eq!(c.action, Action::Set(0));
    // Other numbers are for Modbus registers (a GPIO output refuses them).
    let c = parse_command(br#"{"id":"c","target":"m.sp","action":"set","value":12.5}"#).unwrap();
    assert_eq!(c.action, Action::SetNumber(12.5));
    let c = parse_command(br#"{"id":"c","target":"m.sp","action":"set","value":-3}"#).unwrap();
    assert_eq!(c.action, Action::SetNumber(-3.0));
    let c = parse_command(br#"{"id":"c","target":"r","action":"toggle"}"#).unwrap();
    assert_eq!(c.action, Action::Toggle);
    let c =
        parse_command(br#"{"id":"c","target":"r","action":"pulse","value":{"ms":250}}"#).unwrap();
    assert_eq!(c.action, Action::Pulse(250));
    let c = parse_command(br#"{"id":"c","target":"w","action":"write","value":"GO"}"#).unwrap();
    assert_eq!(c.action, Action::Write("GO".into()));
}

#[test]
fn bad_commands_are_refused_with_id_when_known() {
    for (body, has_id) in [
        (&b"{nope"[..], false),
        (br#"[1]"#, false),
        (br#"{"target":"r","action":"set","value":1}"#, false),
        (br#"{"id":5,"target":"r","action":"set","value":1}"#, false),
        (br#"{"id":"c","action":"set","value":1}"#, true),
        (br#"{"id":"c","target":"r","action":"fly"}"#, true),
        (
            br#"{"id":"c","target":"r","action":"set","value":[2]}"#,
            true,
        ),
        (
            br#"{"id":"c","target":"r","action":"set","value":"1"}"#,
            true,
        ),
        (br#"{"id":"c","target":"r","action":"set"}"#, true),
        (
            br#"{"id":"c","target":"r","action":"toggle","value":1}"#,
            true,
        ),
        (
            br#"{"id":"c","target":"r","action":"pulse","value":5}"#,
            true,
        ),
        (
            br#"{"id":"c","target":"r","action":"pulse","value":{"ms":0}}"#,
            true,
        ),
        (
            br#"{"id":"c","target":"r","action":"pulse","value":{"ms":-5}}"#,
            true,
        ),
        (
            br#"{"id":"c","target":"r","action":"write","value":7}"#,
            true,
        ),
        (
            br#"{"id":"c","target":"r","action":"set","value":1,"x":1}"#,
            true,
        ),
    ] {
        let e = parse_command(body).unwrap_err();
        assert_eq!(e.id.is_some(), has_id, "{}", String::from_utf8_lossy(body));
        assert!(!e.message.is_empty());
    }
}

/// A value serde_json cannot represent does not hide the id: the command is answered.
#[test]
fn unreadable_values_are_answered_under_their_id() {
    let huge = "9".repeat(5000);
    for value in [
        "1e400",
        "-1e400",
        huge.as_str(),
        "{\"ms\":1e400}",
        "[1, 2e999]",
    ] {
        for action in ["set", "pulse", "write"] {
            let body =
                format!(r#"{{"id":"c-7","target":"r","action":"{action}","value":{value}}}"#);
            let e = parse_command(body.as_bytes()).unwrap_err();
            assert_eq!(e.id.as_deref(), Some("c-7"), "{body}");
            assert!(e.message.contains("out of range"), "{}", e.message);
            assert_eq!(command_id(body.as_bytes()).as_deref(), Some("c-7"));
        }
    }
    // The id may come after the unreadable value.
    let e =
        parse_command(br#"{"value":1e400,"target":"r","action":"set","id":"c-8"}"#).unwrap_err();
    assert_eq!(e.id.as_deref(), Some("c-8"));
}

#[test]
fn duplicate_keys_are_refused() {
    // Two different ids: no id can be trusted, nothing to answer under.
    let e = parse_command(br#"{"id":"a","target":"r","action":"toggle","id":"b"}"#).unwrap_err();
    assert_eq!(e.id, None);
    assert!(e.message.contains("different values"), "{}", e.message);
    assert_eq!(command_id(br#"{"id":"a","id":"b"}"#), None);
    let e = parse_command(br#"{"id":"a","target":"r","action":"toggle","id":5}"#).unwrap_err();
    assert_eq!(e.id, None);
    // The same id twice: refused, answered under it.
    let e = parse_command(br#"{"id":"a","target":"r","action":"toggle","id":"a"}"#).unwrap_err();
    assert_eq!(e.id.as_deref(), Some("a"));
    assert!(e.message.contains("duplicate key \"id\""), "{}", e.message);
    // Any other key twice: refused too, not "the last one wins".
    for body in [
        &br#"{"id":"c","target":"r","action":"set","value":0,"value":1}"#[..],
        br#"{"id":"c","target":"r","target":"q","action":"toggle"}"#,
        br#"{"id":"c","target":"r","action":"set","action":"toggle"}"#,
    ] {
        let e = parse_command(body).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c"));
        assert!(e.message.starts_with("duplicate key"), "{}", e.message);
    }
    // Inside value too.
    let e =
        parse_command(br#"{"id":"c","target":"r","action":"pulse","value":{"ms":10,"ms":99999}}"#)
            .unwrap_err();
    assert_eq!(e.id.as_deref(), Some("c"));
    assert!(e.message.contains("nested"), "{}", e.message);
    // Equal keys in different objects are fine.
    let c =
        parse_command(br#"{"id":"c","target":"r","action":"pulse","value":{"ms":10}}"#).unwrap();
    assert_eq!(c.action, Action::Pulse(10));
}

#[test]
fn digest_is_over_target_and_action() {
    let d = |body: &str| parse_command(body.as_bytes()).unwrap().digest();
    let set1 = d(r#"{"id":"a","target":"r","action":"set","value":1}"#);
    assert_eq!(
        set1,
        d(r#"{"action":"set","value":true,"target":"r","id":"b"}"#),
        "same command under another id, other key order and spelling"
    );
    let others = [
        d(r#"{"id":"a","target":"r","action":"set","value":0}"#),
        d(r#"{"id":"a","target":"q","action":"set","value":1}"#),
        d(r#"{"id":"a","target":"r","action":"toggle"}"#),
        d(r#"{"id":"a","target":"r","action":"pulse","value":{"ms":1}}"#),
        d(r#"{"id":"a","target":"r","action":"pulse","value":{"ms":2}}"#),
        d(r#"{"id":"a","target":"r","action":"write","value":"1"}"#),
        d(r#"{"id":"a","target":"r","action":"write","value":"RESET"}"#),
        d(r#"{"id":"a","target":"rw","action":"write","value":"x"}"#),
        d(r#"{"id":"a","target":"r","action":"write","value":"wx"}"#),
    ];
    let mut all: Vec<u64> = others.to_vec();
    all.push(set1);
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        others.len() + 1,
        "every command has its own digest"
    );
}

#[test]
fn nul_lines_are_bad_in_every_format() {
    for (format, line) in [
        (LineFormat::Kv, &b"a=1\0 b=2"[..]),
        (LineFormat::Kv, b"a\0=1"),
        (LineFormat::Raw, b"abc\0"),
        (LineFormat::Json, b"{\"a\":1}\0"),
        (LineFormat::Json, br#"{"a":"x\u0000"}"#),
        (LineFormat::Json, br#"{"a\u0000":1}"#),
        (LineFormat::Json, br#"{"a":[{"b":"\u0000"}]}"#),
    ] {
        assert_eq!(
            parse_line(format, line),
            Err(LineError::Nul),
            "{format:?} {line:?}"
        );
    }
    // An escaped backslash followed by "u0000" is not a NUL.
    assert!(parse_line(LineFormat::Json, br#"{"a":"\\u0000"}"#).is_ok());
}

#[test]
fn json_depth_scan() {
    assert!(!json_depth_exceeds(b"{}", 1));
    assert!(json_depth_exceeds(b"{\"a\":[]}", 1));
    assert!(!json_depth_exceeds(b"{\"a\":[]}", 2));
    // Brackets inside strings, with escaped quotes, do not count.
    assert!(!json_depth_exceeds(br#"{"a":"[[[[\"[[[["}"#, 1));
    assert!(json_depth_exceeds(br#"{"a":"\\"}[[[ "#, 2));
    let deep = format!("{}{}", "[".repeat(9), "]".repeat(9));
    assert!(json_depth_exceeds(deep.as_bytes(), MAX_JSON_DEPTH));
    let ok = format!("{}{}", "[".repeat(8), "]".repeat(8));
    assert!(!json_depth_exceeds(ok.as_bytes(), MAX_JSON_DEPTH));
    // Unbalanced closers never underflow.
    assert!(!json_depth_exceeds(b"]]]]}}{", 1));
}

#[test]
fn command_limits() {
    let deep = format!(
        r#"{{"id":"c-9","target":"r","action":"set","value":{}1{}}}"#,
        "[".repeat(20),
        "]".repeat(20)
    );
    let e = parse_command(deep.as_bytes()).unwrap_err();
    assert_eq!(e.id.as_deref(), Some("c-9"));
    assert!(e.message.contains("deeper"), "{}", e.message);
    let big = format!(
        r#"{{"id":"c-8","target":"r","action":"write","value":"{}"}}"#,
        "x".repeat(MAX_COMMAND_BYTES)
    );
    let e = parse_command(big.as_bytes()).unwrap_err();
    assert_eq!(e.id.as_deref(), Some("c-8"));
    assert!(e.message.contains("limit"), "{}", e.message);
    // Way past serde_json's recursion limit: refused by the scan, no id, no crash.
    let abyss = "[".repeat(100_000);
    assert_eq!(parse_command(abyss.as_bytes()).unwrap_err().id, None);
    assert_eq!(
        command_id(br#"{"id":"x","v":[[[1]]]}"#).as_deref(),
        Some("x")
    );
    assert_eq!(command_id(br#"{"id":5}"#), None);
    let deep_line = format!("{{\"a\":{}{}}}", "[".repeat(9), "]".repeat(9));
    assert_eq!(
        parse_line(LineFormat::Json, deep_line.as_bytes()),
        Err(LineError::TooDeep)
    );
    assert!(parse_ack(abyss.as_bytes()).is_err());
}

#[test]
fn write_values() {
    assert!(check_write_value("GO 12.5", false).is_ok());
    assert!(check_write_value("\x1b[2J", false)
        .unwrap_err()
        .contains("allow_binary"));
    assert!(check_write_value("a\tb", false).is_err());
    assert!(check_write_value("a\u{7f}", false).is_err());
    assert!(check_write_value("a\u{85}", false).is_err());
    assert!(check_write_value("\x1b[2J", true).is_ok());
    assert!(check_write_value(&"x".repeat(MAX_WRITE_BYTES), false).is_ok());
    assert!(check_write_value(&"x".repeat(MAX_WRITE_BYTES + 1), true).is_err());
}

#[test]
fn acks() {
    assert_eq!(parse_ack(br#"{"seq": 42}"#), Ok(42));
    assert_eq!(parse_ack(br#" {"other": [1], "seq": 7}"#), Ok(7));
    let must = Err("ack must be {\"seq\": N} with N a non-negative integer".to_string());
    assert_eq!(parse_ack(br#"{"seq": -1}"#), must);
    assert_eq!(parse_ack(br#"{"seq": 1.5}"#), must);
    assert_eq!(parse_ack(br#"{"n": 1}"#), must);
    assert_eq!(parse_ack(b"[42]"), must);
    assert!(parse_ack(b"{").unwrap_err().starts_with("malformed JSON"));
}

/// The hand-written JSON text is what serde_json would write, for every ASCII byte,
/// multi-byte characters and escapes.
#[test]
fn json_text_matches_serde_json() {
    let mut strings: Vec<String> = (0u8..128).map(|b| format!("a{}b", b as char)).collect();
    strings.extend(
        [
            "",
            "\\\"",
            "température=21.5°C",
            "日本\u{7f}\u{1f}",
            "\u{2028}x",
        ]
        .map(String::from),
    );
    for s in &strings {
        let mut out = String::new();
        push_json_str(&mut out, s);
        assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
    }
    let values = parse_kv("t=1 x=\"q\" f=2.50 big=18446744073709551616 e=-1E-3").unwrap();
    let body = reading_body("gw\"1", 9, "we\\ather", "2026-11-28T01:02:03.456Z", &values);
    let expected = json!({
        "gateway": "gw\"1", "seq": 9, "source": "we\\ather",
        "time": "2026-11-28T01:02:03.456Z",
        "values": {"t": 1, "x": "\"q\"", "f": 2.5, "big": 18446744073709551616.0, "e": -0.001}
    });
    assert_eq!(body, expected.to_string());
    let edge = Values::single("level", &json!(1));
    assert_eq!(edge.as_json(), r#"{"level":1}"#);
}

/// Duplicate keys are found past the scan limit too.
#[test]
fn kv_many_keys() {
    let line: Vec<String> = (0..40).map(|i| format!("k{i}={i}")).collect();
    let ok = parse_kv(&line.join(" ")).unwrap();
    assert_eq!(ok.to_map().len(), 40);
    for dup in [3, 20, 39] {
        let mut l = line.clone();
        l.push(format!("k{dup}=x"));
        assert_eq!(
            parse_kv(&l.join(",")),
            Err(LineError::DuplicateKey(format!("k{dup}")))
        );
    }
}

#[test]
fn time_format() {
    let t = now_rfc3339();
    assert_eq!(t.len(), 24, "{t}");
    assert!(t.ends_with('Z'));
}

/// The optional reading fields: exactly where and how they are written.
#[test]
fn reading_extras() {
    let values = parse_kv("t=1").unwrap();
    let mut out = String::new();
    let extra = ReadingExtra {
        heartbeat: true,
        unsynced: Some((12345, "b\"id")),
    };
    write_reading_body_with(&mut out, "gw", 3, "s", "T", &values, extra);
    assert_eq!(
        out,
        r#"{"gateway":"gw","seq":3,"source":"s","time":"T","clock":"unsynced","mono_ms":12345,"boot_id":"b\"id","heartbeat":true,"values":{"t":1}}"#
    );
    assert_eq!(reading_seq(&out), Some(3));
    write_reading_body_with(
        &mut out,
        "gw",
        4,
        "s",
        "T",
        &values,
        ReadingExtra::default(),
    );
    assert_eq!(out, reading_body("gw", 4, "s", "T", &values));
    assert!(!out.contains("clock") && !out.contains("heartbeat"));
}
