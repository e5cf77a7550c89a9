//! The small `state` file: the spool's identity, the seq reservation floor and the persisted
//! ack, one text line with its own CRC, replaced atomically (write `state.tmp`, fsync, rename,
//! fsync directory).
//!
//! ```text
//! zgate-spool-state v2 id=5f0c3a1e9b7d4c2a8e6f1b3d5a7c9e0f floor=65537 acked=1200 crc=1a2b3c4d
//! ```
//!
//! Version 1 (written by zgate before spools had an identity) has no `id=` field; it is still
//! read, and the spool then gives itself an id and writes version 2.

use crate::spool::record::MAX_SEQ;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

pub(crate) const STATE_FILE: &str = "state";
pub(crate) const STATE_TMP: &str = "state.tmp";

/// Length of a spool id in hex characters (128 bits).
pub(crate) const ID_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    /// The spool's identity: 32 lowercase hex characters. `None` only in a version 1 file.
    pub id: Option<[u8; ID_LEN]>,
    /// Every seq ever handed out is < floor.
    pub floor: u64,
    /// Every seq <= acked was acknowledged by the backend.
    pub acked: u64,
}

pub(crate) enum Loaded {
    Missing,
    Corrupt(String),
    Ok(State),
}

fn body(s: &State) -> String {
    match &s.id {
        Some(id) => format!(
            "zgate-spool-state v2 id={} floor={} acked={}",
            std::str::from_utf8(id).expect("hex id"),
            s.floor,
            s.acked
        ),
        None => format!("zgate-spool-state v1 floor={} acked={}", s.floor, s.acked),
    }
}

pub(crate) fn encode(s: &State) -> String {
    let b = body(s);
    format!("{b} crc={:08x}\n", crc32fast::hash(b.as_bytes()))
}

fn parse_id(text: &str) -> Option<[u8; ID_LEN]> {
    let ok = text.len() == ID_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| text.as_bytes().try_into().expect("length checked"))
}

/// Parses a state line. Values no spool can reach (a floor above `MAX_SEQ + 1`, an ack above
/// `MAX_SEQ`) make it invalid, like a bad checksum.
pub(crate) fn decode(text: &str) -> Option<State> {
    let line = text.strip_suffix('\n')?;
    let (b, crc) = line.rsplit_once(" crc=")?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(b.as_bytes()) {
        return None;
    }
    let mut it = b.split(' ');
    if it.next()? != "zgate-spool-state" {
        return None;
    }
    let id = match it.next()? {
        "v1" => None,
        "v2" => Some(parse_id(it.next()?.strip_prefix("id=")?)?),
        _ => return None,
    };
    let floor: u64 = it.next()?.strip_prefix("floor=")?.parse().ok()?;
    let acked: u64 = it.next()?.strip_prefix("acked=")?.parse().ok()?;
    if it.next().is_some() || floor > MAX_SEQ + 1 || acked > MAX_SEQ {
        return None;
    }
    Some(State { id, floor, acked })
}

pub(crate) fn load(dir: &Path) -> io::Result<Loaded> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    if bytes.len() > 4096 {
        return Ok(Loaded::Corrupt(format!("{} bytes long", bytes.len())));
    }
    match std::str::from_utf8(&bytes).ok().and_then(decode) {
        Some(s) => Ok(Loaded::Ok(s)),
        None => Ok(Loaded::Corrupt(
            "checksum, syntax or value out of range".into(),
        )),
    }
}

/// Writes the state atomically and durably. `dir_handle` is the opened spool directory.
/// Nothing is left behind on failure (a full disk): the temp file is removed.
pub(crate) fn store(dir: &Path, dir_handle: &File, s: &State) -> io::Result<()> {
    let tmp = dir.join(STATE_TMP);
    let res = File::create(&tmp).and_then(|mut f| {
        f.write_all(encode(s).as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, dir.join(STATE_FILE))?;
    dir_handle.sync_all()
}

/// A new random spool id: 128 bits from the kernel's random source, as 32 lowercase hex
/// characters.
pub(crate) fn new_id() -> io::Result<[u8; ID_LEN]> {
    let mut raw = [0u8; ID_LEN / 2];
    let mut got = 0;
    while got < raw.len() {
        // SAFETY: the pointer and length describe the unfilled part of `raw`.
        let n = unsafe {
            libc::getrandom(
                raw[got..].as_mut_ptr().cast::<libc::c_void>(),
                raw.len() - got,
                0,
            )
        };
        if n > 0 {
            got += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Kernels before 3.17 (no getrandom system call).
            Some(libc::ENOSYS) => {
                File::open("/dev/urandom")?.read_exact(&mut raw)?;
                break;
            }
            _ => return Err(e),
        }
    }
    let mut id = [0u8; ID_LEN];
    for (i, b) in raw.iter().enumerate() {
        id[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
        id[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 15)];
    }
    Ok(id)
}
