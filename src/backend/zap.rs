//! The reference backend's ZAP handler (RFC 27): the CURVE allow list.

use crate::limit::LogLimits;
use crate::security;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Log-limit kind of connections the allow list refused.
pub const LOG_ZAP_REJECTED: &str = "connection rejected by the allow list";

/// The ZAP endpoint libzmq asks for authentication (RFC 27).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain of the backend's ROUTER socket.
pub const ZAP_DOMAIN: &str = "zgate";

/// The ids whose `.pub` file in `dir` holds `key` (Z85). Unreadable or malformed files are
/// skipped with a warning.
pub fn allowed_ids(dir: &Path, key: &str) -> Result<Vec<String>, String> {
    Ok(read_allow_dir(dir)?.remove(key).unwrap_or_default())
}

/// Every `.pub` file of `dir`: Z85 key → the ids (sorted) it is registered under. Unreadable
/// or malformed files are skipped with a warning.
fn read_allow_dir(dir: &Path) -> Result<HashMap<String, Vec<String>>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pub") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        match security::load_public_key(&path) {
            Ok(k) => by_key.entry(k).or_default().push(id.to_string()),
            Err(e) => log::warn!("allow list: skipping {}: {e}", path.display()),
        }
    }
    for ids in by_key.values_mut() {
        ids.sort();
    }
    Ok(by_key)
}

/// How long an in-memory copy of the allow list is used while its directory looks unchanged.
pub const ALLOW_LIST_MAX_AGE: Duration = Duration::from_secs(2);

/// The allow list directory in memory (Z85 key → the ids it is registered under), so a burst
/// of handshakes does not read every `.pub` file once per handshake. It is read again when the
/// directory's modification time changed (a file added, removed or renamed: how keys are
/// installed and revoked) and at the latest [`ALLOW_LIST_MAX_AGE`] after the last read (a file
/// rewritten in place).
#[derive(Debug)]
pub struct AllowList {
    dir: PathBuf,
    by_key: HashMap<String, Vec<String>>,
    read: Option<(Instant, SystemTime)>,
}

impl AllowList {
    /// An allow list of `dir`, read on first use.
    pub fn new(dir: PathBuf) -> AllowList {
        AllowList {
            dir,
            by_key: HashMap::new(),
            read: None,
        }
    }

    /// The ids `key` (Z85) is registered under.
    pub fn lookup(&mut self, key: &str, now: Instant) -> Result<Vec<String>, String> {
        let mtime = std::fs::metadata(&self.dir)
            .and_then(|m| m.modified())
            .map_err(|e| format!("cannot read {}: {e}", self.dir.display()))?;
        let fresh = self.read.is_some_and(|(at, m)| {
            m == mtime && now.saturating_duration_since(at) < ALLOW_LIST_MAX_AGE
        });
        if !fresh {
            self.reload()?;
            self.read = Some((now, mtime));
        }
        Ok(self.by_key.get(key).cloned().unwrap_or_default())
    }

    fn reload(&mut self) -> Result<(), String> {
        self.by_key = read_allow_dir(&self.dir)?;
        Ok(())
    }
}

/// A ZAP decision: status code, status text, user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZapDecision {
    /// ZAP status code: "200" accepted, "400" refused, "500" internal error.
    pub status: &'static str,
    /// ZAP status text (the reason of a refusal).
    pub text: String,
    /// The gateway id the key is registered under (accepted only).
    pub user_id: String,
}

/// Decides a ZAP request (frames: version, request id, domain, address, routing id,
/// mechanism, credentials...). `lookup` maps a Z85 client key to the ids it is registered
/// under.
pub fn zap_decide(
    frames: &[Vec<u8>],
    lookup: impl Fn(&str) -> Result<Vec<String>, String>,
) -> ZapDecision {
    let deny = |status: &'static str, text: String| ZapDecision {
        status,
        text,
        user_id: String::new(),
    };
    if frames.len() < 6 || frames[0] != b"1.0" {
        return deny("500", "malformed ZAP request".into());
    }
    if frames[5] != b"CURVE" {
        return deny(
            "400",
            format!(
                "mechanism {} refused: CURVE required",
                String::from_utf8_lossy(&frames[5])
            ),
        );
    }
    let Some(key) = frames
        .get(6)
        .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
    else {
        return deny("400", "no CURVE client key".into());
    };
    let key = security::z85_encode_key(&key);
    match lookup(&key) {
        Ok(ids) if ids.len() == 1 => ZapDecision {
            status: "200",
            text: "OK".into(),
            user_id: ids[0].clone(),
        },
        Ok(ids) if ids.is_empty() => deny("400", format!("key {key} is not in the allow list")),
        Ok(ids) => deny(
            "400",
            format!(
                "key {key} is registered under several ids ({}): refused",
                ids.join(", ")
            ),
        ),
        Err(e) => deny("500", format!("allow list unavailable: {e}")),
    }
}

/// The ZAP handler: a REP socket on [`ZAP_ENDPOINT`], served from the backend's poll loop.
pub struct Zap {
    pub(super) socket: zmq::Socket,
    allow: RefCell<AllowList>,
}

impl Zap {
    /// Binds the handler. Must happen before the CURVE server socket accepts connections.
    pub fn bind(ctx: &zmq::Context, allow_dir: PathBuf) -> Result<Zap, zmq::Error> {
        let socket = ctx.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.bind(ZAP_ENDPOINT)?;
        Ok(Zap {
            socket,
            allow: RefCell::new(AllowList::new(allow_dir)),
        })
    }

    /// Answers every pending request.
    pub fn serve(&self, logs: &mut LogLimits) -> Result<(), zmq::Error> {
        loop {
            let frames = match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let d = zap_decide(&frames, |key| self.allow.borrow_mut().lookup(key, now));
            let address = frames
                .get(3)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default();
            if d.status == "200" {
                log::info!("gateway authenticated gateway={} peer={address}", d.user_id);
            } else if logs.allow(LOG_ZAP_REJECTED, Instant::now()) {
                log::warn!(
                    "connection rejected peer={address} status={} reason=\"{}\"",
                    d.status,
                    d.text
                );
            }
            let empty: &[u8] = b"";
            let request_id = frames.get(1).map_or(empty, Vec::as_slice);
            let reply: [&[u8]; 6] = [
                b"1.0",
                request_id,
                d.status.as_bytes(),
                d.text.as_bytes(),
                d.user_id.as_bytes(),
                b"",
            ];
            self.socket.send_multipart(reply, 0)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn allow_list_follows_keys_added_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let (_, pub_a) = security::keygen(&keys.path().join("a")).unwrap();
        let key = security::load_public_key(&pub_a).unwrap();
        let mut list = AllowList::new(dir.path().to_path_buf());
        let t0 = Instant::now();
        assert!(list.lookup(&key, t0).unwrap().is_empty());
        std::fs::copy(&pub_a, dir.path().join("gw-a.pub")).unwrap();
        // Within the same instant: the directory's new mtime makes it read again.
        let ids = list.lookup(&key, t0).unwrap();
        let ids = if ids.is_empty() {
            // A file system whose mtime did not move (coarse clock): the age bound applies.
            list.lookup(&key, t0 + ALLOW_LIST_MAX_AGE).unwrap()
        } else {
            ids
        };
        assert_eq!(ids, vec!["gw-a"]);
        std::fs::remove_file(dir.path().join("gw-a.pub")).unwrap();
        let later = t0 + ALLOW_LIST_MAX_AGE * 2;
        assert!(
            list.lookup(&key, later).unwrap().is_empty(),
            "a revoked key is refused"
        );
        std::fs::remove_dir(dir.path()).unwrap();
        assert!(list.lookup(&key, later).is_err());
    }
}
