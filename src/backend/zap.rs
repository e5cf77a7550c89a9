//! CURVE authentication of gateways: the ZAP handler and its allow list (`--allow DIR`).

use crate::security;
use std::path::{Path, PathBuf};

/// The ZAP endpoint libzmq asks for authentication (RFC 27).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain of the backend's ROUTER socket.
pub const ZAP_DOMAIN: &str = "zgate";

/// The ids whose `.pub` file in `dir` holds `key` (Z85). Unreadable or malformed files are
/// skipped with a warning.
pub fn allowed_ids(dir: &Path, key: &str) -> Result<Vec<String>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pub") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        match security::load_public_key(&path) {
            Ok(k) if k == key => ids.push(id.to_string()),
            Ok(_) => {}
            Err(e) => log::warn!("allow list: skipping {}: {e}", path.display()),
        }
    }
    ids.sort();
    Ok(ids)
}

/// A ZAP decision: status code, status text, user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZapDecision {
    /// ZAP status code: `"200"` accepts, `"400"` refuses the key, `"500"` means the request
    /// or the allow list could not be read.
    pub status: &'static str,
    /// Why, for libzmq's log and the handshake failure the gateway sees.
    pub text: String,
    /// The accepted gateway's id (its key file's name); empty when refused.
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
    allow_dir: PathBuf,
}

impl Zap {
    /// Binds the handler. Must happen before the CURVE server socket accepts connections.
    pub fn bind(ctx: &zmq::Context, allow_dir: PathBuf) -> Result<Zap, zmq::Error> {
        let socket = ctx.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.bind(ZAP_ENDPOINT)?;
        Ok(Zap { socket, allow_dir })
    }

    /// Answers every pending request.
    pub fn serve(&self) -> Result<(), zmq::Error> {
        loop {
            let frames = match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(f) => f,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e),
            };
            let d = zap_decide(&frames, |key| allowed_ids(&self.allow_dir, key));
            let address = frames
                .get(3)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default();
            if d.status == "200" {
                log::info!("gateway authenticated gateway={} peer={address}", d.user_id);
            } else {
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
