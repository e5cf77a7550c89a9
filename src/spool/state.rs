//! The small `state` file: the seq reservation floor and the persisted ack, one text line with
//! its own CRC, replaced atomically (write `state.tmp`, fsync, rename, fsync directory).
//!
//! ```text
//! zgate-spool-state v1 floor=65537 acked=1200 crc=1a2b3c4d
//! ```

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

pub(crate) const STATE_FILE: &str = "state";
pub(crate) const STATE_TMP: &str = "state.tmp";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
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
    format!("zgate-spool-state v1 floor={} acked={}", s.floor, s.acked)
}

pub(crate) fn encode(s: &State) -> String {
    let b = body(s);
    format!("{b} crc={:08x}\n", crc32fast::hash(b.as_bytes()))
}

pub(crate) fn decode(text: &str) -> Option<State> {
    let line = text.strip_suffix('\n')?;
    let (b, crc) = line.rsplit_once(" crc=")?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(b.as_bytes()) {
        return None;
    }
    let mut it = b.split(' ');
    if it.next()? != "zgate-spool-state" || it.next()? != "v1" {
        return None;
    }
    let floor = it.next()?.strip_prefix("floor=")?.parse().ok()?;
    let acked = it.next()?.strip_prefix("acked=")?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(State { floor, acked })
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
        None => Ok(Loaded::Corrupt("checksum or syntax mismatch".into())),
    }
}

/// Writes the state atomically and durably. `dir_handle` is the opened spool directory.
pub(crate) fn store(dir: &Path, dir_handle: &File, s: &State) -> io::Result<()> {
    let tmp = dir.join(STATE_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(encode(s).as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(STATE_FILE))?;
    dir_handle.sync_all()
}
