//! Reference backend tests: ledger, ZAP decisions, a real ROUTER.

use super::*;

#[test]
fn ledger_acks_contiguous_and_dedupes() {
    let mut l = GatewayLedger::default();
    assert!(l.receive(1));
    assert!(l.receive(2));
    assert!(!l.receive(2));
    assert!(l.receive(4));
    assert_eq!(l.high, 2, "gap at 3 holds the ack back");
    assert!(l.receive(3));
    assert_eq!(l.high, 4);
    assert!(!l.receive(4));
    assert_eq!(l.duplicates, 2);
    assert_eq!(l.received, 4);
}

#[test]
fn ledger_resume_skips_dropped_gap() {
    let mut l = GatewayLedger::default();
    l.receive(1);
    l.receive(10);
    l.receive(11);
    assert_eq!(l.high, 1);
    l.resume(10);
    assert_eq!(l.high, 11);
    l.resume(5);
    assert_eq!(l.high, 11);
}

fn zap_request(mechanism: &str, key: Option<[u8; 32]>) -> Vec<Vec<u8>> {
    let mut f: Vec<Vec<u8>> = vec![
        b"1.0".to_vec(),
        b"1".to_vec(),
        b"zgate".to_vec(),
        b"192.0.2.7".to_vec(),
        b"".to_vec(),
        mechanism.as_bytes().to_vec(),
    ];
    if let Some(k) = key {
        f.push(k.to_vec());
    }
    f
}

#[test]
fn zap_decisions() {
    let a = security::KeyPair::generate().unwrap();
    let b = security::KeyPair::generate().unwrap();
    let (pa, pb) = (a.public.clone(), b.public.clone());
    let lookup = move |k: &str| -> Result<Vec<String>, String> {
        Ok(if k == pa {
            vec!["gw-a".into()]
        } else if k == pb {
            vec!["gw-b".into(), "gw-c".into()]
        } else {
            vec![]
        })
    };
    let d = zap_decide(&zap_request("CURVE", Some(a.public_bytes())), &lookup);
    assert_eq!((d.status, d.user_id.as_str()), ("200", "gw-a"));
    let d = zap_decide(&zap_request("CURVE", Some(b.public_bytes())), &lookup);
    assert_eq!(d.status, "400");
    assert!(d.text.contains("several ids"), "{}", d.text);
    let other = security::KeyPair::generate().unwrap();
    let d = zap_decide(&zap_request("CURVE", Some(other.public_bytes())), &lookup);
    assert_eq!((d.status, d.user_id.as_str()), ("400", ""));
    assert!(d.text.contains("not in the allow list"));
    assert_eq!(
        zap_decide(&zap_request("NULL", None), &lookup).status,
        "400"
    );
    assert_eq!(
        zap_decide(&zap_request("CURVE", None), &lookup).status,
        "400"
    );
    assert_eq!(zap_decide(&[b"1.0".to_vec()], &lookup).status, "500");
    let failing = |_: &str| -> Result<Vec<String>, String> { Err("gone".into()) };
    let d = zap_decide(&zap_request("CURVE", Some(a.public_bytes())), failing);
    assert_eq!(d.status, "500");
}

#[test]
fn allow_dir_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pub_a) = security::keygen(&dir.path().join("gw-a")).unwrap();
    std::fs::write(dir.path().join("junk.pub"), "not a key\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let key = security::load_public_key(&pub_a).unwrap();
    assert_eq!(allowed_ids(dir.path(), &key).unwrap(), vec!["gw-a"]);
    let other = security::KeyPair::generate().unwrap();
    assert!(allowed_ids(dir.path(), &other.public).unwrap().is_empty());
    assert!(allowed_ids(&dir.path().join("missing"), &key).is_err());
}

const SPOOL_A: &str = "0123456789abcdef0123456789abcdef";
const SPOOL_B: &str = "fedcba9876543210fedcba9876543210";

#[test]
fn a_new_spool_id_starts_a_fresh_ledger() {
    let mut l = GatewayLedger::default();
    assert_eq!(l.hello(SPOOL_A, Some(1)), None);
    for seq in 1..=50 {
        assert!(l.receive(seq));
    }
    assert_eq!(l.ack_seq(), 50);
    // The same spool reconnecting keeps its ledger: 1..50 stay duplicates.
    assert_eq!(l.hello(SPOOL_A, Some(51)), None);
    assert!(!l.receive(50));
    // A wiped spool: seqs start again at 1 and are new readings.
    assert_eq!(l.hello(SPOOL_B, Some(1)), Some(SPOOL_A.to_string()));
    assert_eq!(l.ack_seq(), 0);
    for seq in 1..=30 {
        assert!(l.receive(seq), "seq {seq} taken for a duplicate");
    }
    assert_eq!((l.high, l.duplicates, l.received), (30, 0, 30));
    assert_eq!(l.spool_id.as_deref(), Some(SPOOL_B));
}

#[test]
fn hello_is_acked_with_resume_minus_one_never_above_what_was_sent() {
    // Fresh ledger: exactly resume_seq - 1.
    let mut l = GatewayLedger::default();
    l.hello(SPOOL_A, Some(7));
    assert_eq!(l.ack_seq(), 6);
    // Readings 7..=10 arrive: acked as they come.
    for seq in 7..=10 {
        l.receive(seq);
    }
    assert_eq!(l.ack_seq(), 10);
    // The gateway missed that ack and reconnects with resume_seq 8: the answer is 7,
    // not 10, because it has sent nothing on the new connection yet.
    l.hello(SPOOL_A, Some(8));
    assert_eq!(l.ack_seq(), 7);
    // Once it sent 8..=10 again (duplicates here), the ack covers them.
    for seq in 8..=10 {
        assert!(!l.receive(seq));
    }
    assert_eq!(l.ack_seq(), 10);
    // A hello without resume_seq is answered with 0; none with seq 0 underflows.
    let mut l = GatewayLedger::default();
    l.hello("", None);
    assert_eq!(l.ack_seq(), 0);
    l.hello("", Some(0));
    assert_eq!(l.ack_seq(), 0);
}

#[test]
fn extreme_seqs_do_not_overflow() {
    let mut l = GatewayLedger::default();
    assert!(l.receive(u64::MAX - 1));
    assert!(l.receive(u64::MAX));
    assert_eq!(l.high, u64::MAX);
    assert!(!l.receive(u64::MAX));
    l.resume(u64::MAX);
    let mut l = GatewayLedger::default();
    l.receive(1);
    l.receive(u64::MAX);
    l.resume(u64::MAX);
    assert_eq!(l.high, u64::MAX);
    assert!(is_spool_id(SPOOL_A) && !is_spool_id("xyz") && !is_spool_id(&SPOOL_A[1..]));
}

#[test]
fn router_sends_heartbeats() {
    let ctx = zmq::Context::new();
    let b = Backend::new(
        &ctx,
        BackendOptions {
            bind: "tcp://127.0.0.1:*".into(),
            ack: true,
            ..Default::default()
        },
    )
    .unwrap();
    // (ZMQ_ROUTER_HANDOVER cannot be read back: tests/py/test_backend_link.py checks it.)
    let s = b.socket();
    assert_eq!(s.get_heartbeat_ivl().unwrap(), HEARTBEAT_IVL_MS);
    assert_eq!(s.get_heartbeat_timeout().unwrap(), HEARTBEAT_TIMEOUT_MS);
}

#[test]
fn first_contact_without_hello_starts_at_first_seq() {
    let mut l = GatewayLedger::default();
    assert!(l.receive(500));
    assert_eq!(l.high, 500);
}
