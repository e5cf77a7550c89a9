//! Acks: which ones [`Delivery::accept_ack`] lets through, and how the seq of a sent
//! reading is read back ([`reading_seq`]).

use super::*;
use crate::protocol::{reading_seq, write_reading_body, Values};

fn view(first_unacked: Option<u64>, next_seq: u64) -> SpoolView {
    SpoolView {
        first_unacked,
        next_seq,
        sendable_end: next_seq,
    }
}

/// A connection whose hello announced resume_seq = 101 with 3,000 readings waiting: right
/// after the hello, nothing above 100 was sent, so nothing above 100 may be acked.
#[test]
fn an_ack_above_what_was_sent_is_refused() {
    let t0 = Instant::now();
    let v = view(Some(101), 3101);
    let mut d = Delivery::new(&SpoolConfig::default(), v, t0);
    let mut fx = Effects::default();
    d.on_connected(v, t0, &mut fx);
    // The answer to the hello, and anything below it.
    assert!(d.accept_ack(100, v, 0, t0));
    assert!(d.accept_ack(0, v, 0, t0));
    // Above it, before any reading went out: refused, however large.
    assert!(!d.accept_ack(101, v, 0, t0));
    assert!(!d.accept_ack(138, v, 0, t0));
    assert!(!d.accept_ack(10u64.pow(18), v, 0, t0));
    assert!(!d.accept_ack(u64::MAX, v, 0, t0));
    // Readings 101..=400 were handed to libzmq: up to 400 may be acked, not 401.
    assert!(d.accept_ack(400, v, 400, t0));
    assert!(d.accept_ack(250, v, 400, t0));
    assert!(!d.accept_ack(401, v, 400, t0));
    assert!(!d.accept_ack(10u64.pow(18), v, 400, t0));
}

/// The floor is the hello's resume_seq - 1, or the spool's now (everything below is acked
/// or dropped, so such an ack changes nothing); each connection gets its own floor.
#[test]
fn the_floor_follows_each_hello_and_the_spool() {
    let t0 = Instant::now();
    let mut d = Delivery::new(&SpoolConfig::default(), view(None, 1), t0);
    let mut fx = Effects::default();
    assert!(d.accept_ack(0, view(None, 1), 0, t0));
    assert!(!d.accept_ack(1, view(None, 1), 0, t0));
    d.on_connected(view(Some(51), 60), t0, &mut fx);
    assert!(d.accept_ack(50, view(Some(51), 60), 0, t0));
    assert!(!d.accept_ack(51, view(Some(51), 60), 0, t0));
    // The spool dropped its oldest readings up to 54 meanwhile: an ack of 54 is harmless.
    assert!(d.accept_ack(54, view(Some(55), 60), 0, t0));
    assert!(!d.accept_ack(55, view(Some(55), 60), 0, t0));
    // A later connection announced a higher resume_seq.
    d.on_disconnected();
    d.on_connected(view(Some(58), 60), t0, &mut fx);
    assert!(d.accept_ack(57, view(Some(58), 60), 0, t0));
    assert!(!d.accept_ack(58, view(Some(58), 60), 0, t0));
}

#[test]
fn reading_seq_reads_the_writers_bodies() {
    let mut body = String::new();
    let values = Values::single("line", &serde_json::json!("seq=1,\"seq\":2"));
    for (gateway, seq) in [
        ("gw-01", 1u64),
        ("gw,\"seq\":7,", 42),
        ("a\\\"seq\":9", u64::MAX),
    ] {
        write_reading_body(
            &mut body,
            gateway,
            seq,
            "src",
            "2026-01-01T00:00:00.000Z",
            &values,
        );
        assert_eq!(reading_seq(&body), Some(seq), "{body}");
    }
    // Another layout: parsed as JSON.
    assert_eq!(reading_seq(r#"{"seq": 5, "gateway": "g"}"#), Some(5));
    assert_eq!(reading_seq(r#"{"gateway":"g","values":{}}"#), None);
    assert_eq!(reading_seq("not json"), None);
}
