use super::*;

const A: &str = "0123456789abcdef0123456789abcdef";
const B: &str = "fedcba9876543210fedcba9876543210";

fn flow(max: usize) -> (Flow, Instant) {
    (Flow::new(max, Duration::from_secs(30)), Instant::now())
}

fn publish(f: &mut Flow, seq: u64, now: Instant) {
    assert_eq!(
        f.on_reading(seq, now),
        ReadingAction::Publish {
            spool_id: f.spool_id().unwrap().into()
        },
        "seq {seq}"
    );
}

#[test]
fn hello_is_answered_with_resume_minus_one() {
    let (mut f, _) = flow(8);
    assert_eq!(f.take_ack(), None);
    f.on_hello(A, Some(5));
    assert_eq!(f.take_ack(), Some((4, true)));
    assert_eq!(f.take_ack(), None, "one ack per batch");
}

#[test]
fn nothing_is_acked_before_jetstream_confirms() {
    let (mut f, now) = flow(8);
    f.on_hello(A, Some(1));
    f.take_ack();
    for seq in 1..=3 {
        publish(&mut f, seq, now);
    }
    assert_eq!(f.take_ack(), None, "published is not confirmed");
    f.on_outcome(A, 2, true);
    f.on_outcome(A, 3, true);
    assert_eq!(f.take_ack(), None, "seq 1 holds 2 and 3 back");
    f.on_outcome(A, 1, true);
    assert_eq!(f.take_ack(), Some((3, true)));
}

#[test]
fn a_failed_publish_holds_back_every_later_ack_until_its_resend_is_confirmed() {
    let (mut f, now) = flow(8);
    f.on_hello(A, Some(1));
    f.take_ack();
    for seq in 1..=3 {
        publish(&mut f, seq, now);
    }
    f.on_outcome(A, 1, true);
    f.on_outcome(A, 2, false);
    f.on_outcome(A, 3, true);
    assert_eq!(f.take_ack(), Some((1, true)));
    assert_eq!(f.inflight(), 0);
    // The gateway resends 2 and 3 (retransmit): 2 is published again, 3 is a duplicate.
    publish(&mut f, 2, now);
    assert_eq!(f.on_reading(3, now), ReadingAction::Duplicate);
    assert_eq!(
        f.take_ack(),
        Some((1, false)),
        "a duplicate is re-acked, not beyond the gap"
    );
    f.on_outcome(A, 2, true);
    assert_eq!(f.take_ack(), Some((3, true)));
}

#[test]
fn while_jetstream_is_down_nothing_is_acked() {
    let (mut f, now) = flow(4);
    f.on_hello(A, Some(1));
    f.take_ack();
    for round in 0..3 {
        for seq in 1..=4 {
            publish(&mut f, seq, now);
        }
        for seq in 1..=4 {
            f.on_outcome(A, seq, false);
        }
        assert_eq!(f.take_ack(), None, "round {round}");
    }
}

#[test]
fn at_most_max_inflight_unconfirmed() {
    let (mut f, now) = flow(2);
    f.on_hello(A, Some(1));
    publish(&mut f, 1, now);
    publish(&mut f, 2, now);
    assert_eq!(f.on_reading(3, now), ReadingAction::OverLimit);
    assert_eq!(f.on_reading(2, now), ReadingAction::InFlight);
    f.on_outcome(A, 1, true);
    publish(&mut f, 3, now);
    assert_eq!(f.inflight(), 2);
}

#[test]
fn acks_never_exceed_what_was_sent_on_the_current_connection() {
    let (mut f, now) = flow(8);
    f.on_hello(A, Some(1));
    f.take_ack();
    for seq in 1..=3 {
        publish(&mut f, seq, now);
    }
    // The connection drops; the gateway comes back having resent nothing yet.
    f.on_hello(A, Some(1));
    assert_eq!(f.take_ack(), Some((0, false)));
    // Late PubAcks of the old connection's publishes.
    for seq in 1..=3 {
        f.on_outcome(A, seq, true);
    }
    assert_eq!(f.take_ack(), None, "nothing sent on this connection yet");
    assert_eq!(f.on_reading(1, now), ReadingAction::Duplicate);
    assert_eq!(f.take_ack(), Some((1, true)));
    assert_eq!(f.on_reading(3, now), ReadingAction::Duplicate);
    assert_eq!(f.take_ack(), Some((3, true)));
}

#[test]
fn a_new_spool_starts_afresh_and_ignores_the_old_spools_outcomes() {
    let (mut f, now) = flow(8);
    f.on_hello(A, Some(1));
    publish(&mut f, 1, now);
    publish(&mut f, 2, now);
    assert_eq!(f.on_hello(B, Some(1)).as_deref(), Some(A));
    assert_eq!(f.take_ack(), Some((0, false)));
    assert_eq!(f.inflight(), 0);
    f.on_outcome(A, 1, true);
    assert_eq!(
        f.take_ack(),
        None,
        "an outcome of the old spool changes nothing"
    );
    publish(&mut f, 1, now);
    f.on_outcome(B, 1, true);
    assert_eq!(f.take_ack(), Some((1, true)));
}

#[test]
fn readings_before_a_hello_are_not_published() {
    let (mut f, now) = flow(8);
    assert_eq!(f.on_reading(1, now), ReadingAction::NoHello);
    assert_eq!(f.take_ack(), None);
}

#[test]
fn stats_close_a_gap_the_gateway_dropped() {
    let (mut f, now) = flow(8);
    f.on_hello(A, Some(1));
    f.take_ack();
    publish(&mut f, 1, now);
    publish(&mut f, 3, now);
    f.on_outcome(A, 1, true);
    f.on_outcome(A, 3, true);
    assert_eq!(f.take_ack(), Some((1, true)));
    f.on_stats(B, 3);
    assert_eq!(f.take_ack(), None, "stats of another spool");
    f.on_stats(A, 3);
    assert_eq!(f.take_ack(), Some((3, true)));
}

#[test]
fn lost_outcomes_expire_so_the_resend_is_published() {
    let (mut f, now) = flow(1);
    f.on_hello(A, Some(1));
    publish(&mut f, 1, now);
    assert_eq!(f.expire(now + Duration::from_secs(29)), 0);
    assert_eq!(f.on_reading(2, now), ReadingAction::OverLimit);
    assert_eq!(f.expire(now + Duration::from_secs(30)), 1);
    publish(&mut f, 1, now + Duration::from_secs(31));
}
