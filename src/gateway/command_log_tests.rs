//! Command log tests on real files in a temp directory.

use super::*;
use crate::gateway::effect::{Effect, Effects};
use std::time::Instant;

fn entry(reply: &str, digest: u64) -> CachedReply {
    CachedReply {
        reply: Some(protocol::Message {
            kind: protocol::KIND_REPLY,
            body: reply.to_string(),
        }),
        body: BodyDigest::Command(digest),
    }
}

fn ids(entries: &[(String, CachedReply)]) -> Vec<&str> {
    entries.iter().map(|(id, _)| id.as_str()).collect()
}

/// Applies the commands' effects as the interpreter does: log entries to the file (with
/// compaction), replies returned.
fn apply(fx: &mut Effects, log: &mut CommandLog, c: &Commands) -> Vec<String> {
    let mut sent = Vec::new();
    for e in fx.drain() {
        match e {
            Effect::RememberReply { id, entry } => {
                if log.append(&id, &entry).unwrap() {
                    log.compact(c.remembered());
                }
            }
            Effect::Send(m) => sent.push(m.body),
            other => panic!("unexpected {other:?}"),
        }
    }
    sent
}

#[test]
fn entries_come_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, got) = CommandLog::open(dir.path()).unwrap();
    assert!(got.is_empty());
    let unparsed = CachedReply {
        body: BodyDigest::Unparsed(7),
        ..entry(r#"{"id":"b","ok":false,"error":"bad"}"#, 0)
    };
    log.append("a", &entry(r#"{"id":"a","ok":true}"#, 1))
        .unwrap();
    log.append("b", &unparsed).unwrap();
    let pending = CachedReply {
        reply: None,
        body: BodyDigest::Command(3),
    };
    log.append("in-progress", &pending).unwrap();
    log.append("c", &entry(r#"{"id":"c","ok":true}"#, 2))
        .unwrap();
    assert_eq!(log.records(), 3, "an entry without a reply is not written");
    log.flush();
    drop(log);
    let (_log, got) = CommandLog::open(dir.path()).unwrap();
    assert_eq!(ids(&got), vec!["a", "b", "c"]);
    assert_eq!(got[0].1, entry(r#"{"id":"a","ok":true}"#, 1));
    assert_eq!(got[1].1, unparsed);
}

/// A power cut mid-append leaves part of a record: it is ignored (never a failed start), the
/// file is rewritten without it, and appends after the restart are read back.
#[test]
fn torn_tail_is_ignored_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = CommandLog::open(dir.path()).unwrap();
    for i in 0..4 {
        let id = format!("t-{i}");
        log.append(&id, &entry(&format!(r#"{{"id":"{id}","ok":true}}"#), i))
            .unwrap();
    }
    drop(log);
    let path = dir.path().join(FILE_NAME);
    let len = fs::metadata(&path).unwrap().len();
    for cut in [1, 5, 12] {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - cut).unwrap();
        let s = scan(&fs::read(&path).unwrap());
        assert!(s.torn_bytes > 0 && s.corrupt_bytes == 0, "{s:?}");
        assert_eq!(s.entries.len(), 3);
    }
    let mut commands = Commands::new(100, Instant::now());
    let mut log = CommandLog::open_into(dir.path(), &mut commands).unwrap();
    let s = scan(&fs::read(&path).unwrap());
    assert_eq!((s.torn_bytes, s.corrupt_bytes), (0, 0), "rewritten at open");
    assert_eq!(ids(&s.entries), vec!["t-0", "t-1", "t-2"]);
    log.append("t-9", &entry(r#"{"id":"t-9","ok":true}"#, 9))
        .unwrap();
    drop(log);
    let (_log, got) = CommandLog::open(dir.path()).unwrap();
    assert_eq!(ids(&got), vec!["t-0", "t-1", "t-2", "t-9"]);
}

/// A flipped bit in one record loses that record only: the later ones are found again by
/// their magic and checksum. A file that is not a command log at all starts empty.
#[test]
fn corrupt_record_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = CommandLog::open(dir.path()).unwrap();
    let mut offsets = Vec::new();
    let path = dir.path().join(FILE_NAME);
    for i in 0..4 {
        offsets.push(fs::metadata(&path).unwrap().len() as usize);
        let id = format!("k-{i}");
        log.append(&id, &entry(&format!(r#"{{"id":"{id}","ok":true}}"#), i))
            .unwrap();
    }
    drop(log);
    let mut data = fs::read(&path).unwrap();
    data[offsets[1] + 9] ^= 0x10;
    fs::write(&path, &data).unwrap();
    let mut commands = Commands::new(100, Instant::now());
    let _log = CommandLog::open_into(dir.path(), &mut commands).unwrap();
    let got: Vec<_> = commands
        .remembered()
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(got, vec!["k-0", "k-2", "k-3"]);
    let s = scan(&fs::read(&path).unwrap());
    assert_eq!(s.corrupt_bytes, 0, "rewritten at open");
    drop(_log);

    fs::write(&path, b"something else entirely").unwrap();
    let (mut log, got) = CommandLog::open(dir.path()).unwrap();
    assert!(got.is_empty());
    assert!(log.wants_compaction());
    log.compact(std::iter::empty());
    log.flush();
    assert_eq!(fs::read(&path).unwrap(), FILE_HEADER);
}

/// Whatever the bytes, a scan neither panics nor reads a record that is not whole.
#[test]
fn scan_survives_garbage() {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut good = FILE_HEADER.to_vec();
    for i in 0..20 {
        encode(
            &format!("g-{i}"),
            &entry(r#"{"id":"g","ok":true}"#, i),
            &mut good,
        );
    }
    for _ in 0..300 {
        let mut data = good.clone();
        let n = (next() % 8) as usize;
        for _ in 0..n {
            let at = (next() as usize) % data.len();
            data[at] = next() as u8;
        }
        data.truncate((next() as usize) % (data.len() + 1));
        let s = scan(&data);
        assert!(s.entries.len() <= 20);
        let bad = s.corrupt_bytes + s.torn_bytes;
        assert!(bad <= data.len());
    }
}

/// Past 2 × the cache the file is rewritten with the remembered ids (temp file + rename);
/// its size stays bounded and a reopen has exactly the newest ids.
#[test]
fn compaction_bounds_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut commands = Commands::new(u32::MAX, t0);
    let mut log = CommandLog::open_into(dir.path(), &mut commands).unwrap();
    let path = dir.path().join(FILE_NAME);
    let mut fx = Effects::default();
    let mut max_records = 0;
    let total = 5 * REPLY_CACHE + 17;
    for i in 0..total {
        let body = format!(r#"{{"id":"x-{i}","target":"relay1","action":"toggle"}}"#);
        let cmd = commands.on_command(body.as_bytes(), t0, &mut fx).unwrap();
        commands.finish(&cmd.id, Ok(()), t0, &mut fx);
        apply(&mut fx, &mut log, &commands);
        max_records = max_records.max(log.records());
        if i % 700 == 0 {
            // The helper's sync and rename happen meanwhile, or at the flush.
            log.tick().unwrap();
        }
    }
    assert!(max_records <= COMPACT_AFTER + 1, "{max_records}");
    log.flush();
    assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());
    let size = fs::metadata(&path).unwrap().len() as usize;
    let per_record = OVERHEAD + 1 + "x-0000".len() + 9 + r#"{"id":"x-0000","ok":true}"#.len();
    assert!(size <= 8 + (COMPACT_AFTER + 1) * per_record, "{size}");
    drop(log);
    let mut again = Commands::new(100, t0);
    let _log = CommandLog::open_into(dir.path(), &mut again).unwrap();
    let got: Vec<_> = again.remembered().map(|(id, _)| id.to_string()).collect();
    let want: Vec<_> = (total - REPLY_CACHE..total)
        .map(|i| format!("x-{i}"))
        .collect();
    assert_eq!(got, want);
}

/// The point of the log: after a restart a retried id is answered with its first reply and
/// not executed; the same id with another command is still refused; an id that was refused
/// as a bad command keeps that refusal.
#[test]
fn restart_keeps_replies_and_digests() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let set1 = br#"{"id":"d-1","target":"relay1","action":"set","value":1}"#;
    let bad = br#"{"id":"d-2","target":"relay1","action":"set","value":"7"}"#;
    let (first, refusal) = {
        let mut c = Commands::new(100, t0);
        let mut log = CommandLog::open_into(dir.path(), &mut c).unwrap();
        let mut fx = Effects::default();
        let cmd = c.on_command(set1, t0, &mut fx).expect("runs");
        c.finish(&cmd.id, Ok(()), t0, &mut fx);
        let first = apply(&mut fx, &mut log, &c);
        assert!(c.on_command(bad, t0, &mut fx).is_none());
        let refusal = apply(&mut fx, &mut log, &c);
        log.flush();
        (first, refusal)
    };
    assert_eq!(first, vec![r#"{"id":"d-1","ok":true}"#.to_string()]);

    let mut c = Commands::new(100, t0);
    let mut log = CommandLog::open_into(dir.path(), &mut c).unwrap();
    let mut fx = Effects::default();
    let same = br#"{"id":"d-1","action":"set","value":true,"target":"relay1"}"#;
    assert!(c.on_command(same, t0, &mut fx).is_none(), "not run again");
    assert_eq!(apply(&mut fx, &mut log, &c), first, "the original reply");
    assert!(c.on_command(bad, t0, &mut fx).is_none());
    assert_eq!(apply(&mut fx, &mut log, &c), refusal);
    let other = br#"{"id":"d-1","target":"relay1","action":"set","value":0}"#;
    assert!(c.on_command(other, t0, &mut fx).is_none(), "not run");
    let r = apply(&mut fx, &mut log, &c);
    assert!(r[0].contains("reused with a different command"), "{r:?}");
    assert_eq!(
        (c.ok, c.failed),
        (0, 1),
        "counters are this run's: retries are not counted"
    );
}

/// A compaction that never reached its rename (a crash) leaves a temp file: it is removed at
/// open and the log is read as it was.
#[test]
fn leftover_temp_file_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = CommandLog::open(dir.path()).unwrap();
    log.append("a", &entry(r#"{"id":"a","ok":true}"#, 1))
        .unwrap();
    drop(log);
    let tmp = dir.path().join(format!("{FILE_NAME}.tmp"));
    fs::write(&tmp, b"half a compaction").unwrap();
    let (_log, got) = CommandLog::open(dir.path()).unwrap();
    assert_eq!(ids(&got), vec!["a"]);
    assert!(!tmp.exists());
}

/// An unwritable data_dir fails the start with the path and the fix.
#[test]
fn unwritable_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let e = CommandLog::open(&file).err().expect("fails").to_string();
    assert!(e.contains("not-a-dir") && e.contains("data_dir"), "{e}");
}
