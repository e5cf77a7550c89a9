//! The backend → gateway parsers: `command` and `ack` bodies, and the checks around them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zgate::protocol::{
    check_write_value, command_id, json_depth_exceeds, parse_ack, parse_command, Action,
    MAX_ID_LEN, MAX_JSON_DEPTH,
};

fuzz_target!(|data: &[u8]| {
    let _ = parse_ack(data);
    let _ = command_id(data);
    let deep = json_depth_exceeds(data, MAX_JSON_DEPTH);
    match parse_command(data) {
        Ok(cmd) => {
            assert!(!deep, "a command nested deeper than the limit was accepted");
            assert!(!cmd.id.is_empty() && cmd.id.len() <= MAX_ID_LEN);
            match cmd.action {
                Action::Set(v) => assert!(v <= 1),
                Action::SetNumber(v) => assert!(v.is_finite()),
                Action::Pulse(ms) => assert!(ms > 0),
                Action::Write(ref s) => {
                    let _ = check_write_value(s, false);
                    let _ = check_write_value(s, true);
                }
                Action::Toggle => {}
            }
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            if let Some(id) = e.id {
                assert!(!id.is_empty() && id.len() <= MAX_ID_LEN);
            }
        }
    }
});
