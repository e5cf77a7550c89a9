//! Link security: CURVE keys (Z85), key files, the endpoint policy and `zgate keygen`.
//!
//! Key files (see docs/security.md):
//! - `NAME.key`: the 40-character Z85 CURVE *secret* key on one line. The key rule (checked
//!   by the gateway, `zgate check-config` and the reference backend; applied by the package's
//!   postinst): owned by root or the user zgate runs as, mode 0640 or stricter, and
//!   group-readable only by the group zgate runs as ([`check_key_file`]).
//! - `NAME.pub`: the 40-character Z85 *public* key and a newline.
//!
//! Only the secret key is stored in the `.key` file: the public key is derived from it with
//! libzmq's `zmq_curve_public` (declared below: the `zmq`/`zmq-sys` crates do not bind it;
//! the symbol comes from the system libzmq they link).

mod keyfile;

pub use keyfile::{
    check_key_file, group_id, group_name, read_secret_key, user_name, KeyFileError, RunAs,
};

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Length of a Z85-encoded 32-byte CURVE key.
pub const Z85_KEY_LEN: usize = 40;

const Z85_ALPHABET: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

fn z85_index(b: u8) -> Option<u32> {
    Z85_ALPHABET.iter().position(|&c| c == b).map(|i| i as u32)
}

/// Decodes a 40-character Z85 CURVE key into its 32 bytes, checking length and alphabet.
pub fn z85_decode_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = text.as_bytes();
    if bytes.len() != Z85_KEY_LEN {
        return Err(format!(
            "a CURVE key is {Z85_KEY_LEN} Z85 characters, got {}",
            bytes.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, chunk) in bytes.chunks(5).enumerate() {
        let mut value: u64 = 0;
        for &b in chunk {
            let d = z85_index(b).ok_or_else(|| {
                format!(
                    "character {:?} is not in the Z85 alphabet",
                    char::from(b).escape_default().to_string()
                )
            })?;
            value = value * 85 + u64::from(d);
        }
        let value = u32::try_from(value).map_err(|_| "not a valid Z85 key".to_string())?;
        out[i * 4..i * 4 + 4].copy_from_slice(&value.to_be_bytes());
    }
    Ok(out)
}

/// Encodes 32 key bytes as 40 Z85 characters.
pub fn z85_encode_key(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(Z85_KEY_LEN);
    for chunk in key.chunks(4) {
        let mut value = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let mut digits = [0u8; 5];
        for d in digits.iter_mut().rev() {
            *d = Z85_ALPHABET[(value % 85) as usize];
            value /= 85;
        }
        s.extend(digits.iter().map(|&b| char::from(b)));
    }
    s
}

/// Fails unless the linked libzmq supports CURVE.
pub fn require_curve() -> Result<(), String> {
    if zmq::has("curve") == Some(true) {
        Ok(())
    } else {
        let (a, b, c) = zmq::version();
        Err(format!(
            "the linked libzmq {a}.{b}.{c} was built without CURVE support (zmq_has(\"curve\") \
             is false); install a libzmq built with libsodium (Debian: libzmq5)"
        ))
    }
}

extern "C" {
    /// libzmq ≥ 4.2.1: derives the Z85 public key (41 bytes with NUL) from a Z85 secret key.
    fn zmq_curve_public(
        z85_public_key: *mut std::os::raw::c_char,
        z85_secret_key: *const std::os::raw::c_char,
    ) -> std::os::raw::c_int;
}

/// Derives the public key (Z85) from a secret key (Z85) with libzmq's `zmq_curve_public`.
pub fn curve_public(secret_z85: &str) -> Result<String, String> {
    z85_decode_key(secret_z85)?;
    let secret = std::ffi::CString::new(secret_z85).map_err(|e| e.to_string())?;
    let mut public = [0u8; Z85_KEY_LEN + 1];
    // SAFETY: `public` has room for 40 characters and the terminating NUL, `secret` is a
    // NUL-terminated 40-character Z85 string, as zmq_curve_public requires.
    let rc = unsafe {
        zmq_curve_public(
            public.as_mut_ptr().cast::<std::os::raw::c_char>(),
            secret.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "zmq_curve_public failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    String::from_utf8(public[..Z85_KEY_LEN].to_vec()).map_err(|e| e.to_string())
}

/// A CURVE key pair in Z85.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The public key: 40 Z85 characters (32 bytes).
    pub public: String,
    /// The secret key: 40 Z85 characters (32 bytes); redacted in `Debug`.
    pub secret: String,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl KeyPair {
    /// A fresh key pair from libzmq (libsodium's random source).
    pub fn generate() -> Result<KeyPair, String> {
        require_curve()?;
        let pair = zmq::CurveKeyPair::new().map_err(|e| format!("zmq_curve_keypair: {e}"))?;
        Ok(KeyPair {
            public: z85_encode_key(&pair.public_key),
            secret: z85_encode_key(&pair.secret_key),
        })
    }

    /// The public key's 32 bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        z85_decode_key(&self.public).expect("validated at construction")
    }

    /// The secret key's 32 bytes.
    pub fn secret_bytes(&self) -> [u8; 32] {
        z85_decode_key(&self.secret).expect("validated at construction")
    }
}

/// Where the installed package puts docs/security.md; error messages point there.
pub const SECURITY_DOC: &str = "/usr/share/doc/zgate/security.md";

/// [`read_secret_key`] with the error as text; fails as well when libzmq has no CURVE.
pub fn load_secret_key(path: &Path) -> Result<KeyPair, String> {
    require_curve()?;
    read_secret_key(path).map_err(|e| e.to_string())
}

/// Reads a public key file (`NAME.pub`): one Z85 key.
pub fn load_public_key(path: &Path) -> Result<String, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("cannot read public key file {}: {e}", path.display()))?;
    let key = text.trim();
    z85_decode_key(key).map_err(|e| format!("public key file {}: {e}", path.display()))?;
    Ok(key.to_string())
}

/// `zgate keygen --out PREFIX`: writes `PREFIX.key` (0600) and `PREFIX.pub` (0644); never
/// overwrites an existing file. Returns both paths.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), String> {
    let key_path = with_suffix(prefix, "key");
    let pub_path = with_suffix(prefix, "pub");
    for p in [&key_path, &pub_path] {
        if p.symlink_metadata().is_ok() {
            return Err(format!(
                "{} already exists: not overwriting it (choose another --out or remove it)",
                p.display()
            ));
        }
    }
    let pair = KeyPair::generate()?;
    write_new(&key_path, 0o600, &format!("{}\n", pair.secret))?;
    if let Err(e) = write_new(&pub_path, 0o644, &format!("{}\n", pair.public)) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((key_path, pub_path))
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    // The umask may have removed bits (never added any): set the mode exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(text.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// True for endpoints that never leave the machine: `ipc://`, `inproc://`, and `tcp://` to
/// 127.0.0.0/8, `localhost` or `[::1]`.
pub fn endpoint_is_local(endpoint: &str) -> bool {
    if endpoint.starts_with("ipc://") || endpoint.starts_with("inproc://") {
        return true;
    }
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return false;
    };
    // `tcp://source;destination`: the destination decides.
    let dest = rest.rsplit(';').next().unwrap_or(rest);
    let host = if let Some(v6) = dest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        }
    } else {
        match dest.rsplit_once(':') {
            Some((h, _)) => h,
            None => return false,
        }
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return ip.is_loopback();
    }
    if let Ok(ip) = host.parse::<Ipv6Addr>() {
        return ip.is_loopback();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example key pair from the ZeroMQ RFC 26 / zmq_curve manual.
    const SECRET: &str = "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs";
    const PUBLIC: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";

    #[test]
    fn z85_round_trip_and_validation() {
        let k = z85_decode_key(PUBLIC).unwrap();
        assert_eq!(z85_encode_key(&k), PUBLIC);
        assert!(z85_decode_key("short").is_err());
        assert!(z85_decode_key(&PUBLIC.replace('Y', "~")).is_err());
        assert!(z85_decode_key(&PUBLIC.replace('Y', "\"")).is_err());
        // "#####" is 85^5-1 > u32::MAX.
        let overflow = format!("#####{}", &PUBLIC[5..]);
        assert!(z85_decode_key(&overflow).is_err());
        // Agrees with libzmq's encoder.
        assert_eq!(zmq::z85_encode(&k).unwrap(), PUBLIC);
    }

    #[test]
    fn public_key_is_derived_from_secret() {
        assert_eq!(curve_public(SECRET).unwrap(), PUBLIC);
        let pair = KeyPair::generate().unwrap();
        assert_eq!(curve_public(&pair.secret).unwrap(), pair.public);
        assert!(!format!("{pair:?}").contains(&pair.secret));
    }

    #[test]
    fn keygen_writes_modes_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("gw-01");
        let (k, p) = keygen(&prefix).unwrap();
        assert_eq!(
            fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let pair = load_secret_key(&k).unwrap();
        assert_eq!(load_public_key(&p).unwrap(), pair.public);
        let before = fs::read(&k).unwrap();
        assert!(keygen(&prefix).unwrap_err().contains("already exists"));
        assert_eq!(fs::read(&k).unwrap(), before);
        fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_secret_key(&k).unwrap_err().contains("has mode 0644"));
        // Group-readable by this process's own group: accepted.
        fs::set_permissions(&k, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(load_secret_key(&k).unwrap(), pair);
        fs::write(&k, "garbage\n").unwrap();
        let e = read_secret_key(&k).unwrap_err();
        assert!(matches!(e, KeyFileError::Format { .. }), "{e}");
        let e = read_secret_key(&dir.path().join("missing.key")).unwrap_err();
        assert!(matches!(e, KeyFileError::Unavailable { .. }), "{e}");
    }

    #[test]
    fn local_endpoints() {
        for ep in [
            "ipc:///tmp/x.ipc",
            "inproc://x",
            "tcp://127.0.0.1:5555",
            "tcp://127.1.2.3:1",
            "tcp://localhost:5555",
            "tcp://[::1]:5555",
            "tcp://eth0;127.0.0.1:5555",
        ] {
            assert!(endpoint_is_local(ep), "{ep}");
        }
        for ep in [
            "tcp://192.0.2.1:5555",
            "tcp://0.0.0.0:5555",
            "tcp://backend.example:5555",
            "tcp://[2001:db8::1]:5555",
            "tcp://127.0.0.1;192.0.2.1:5555",
            "tcp://localhost.evil:5555",
            "tcp://127.0.0.1",
            "pgm://x",
        ] {
            assert!(!endpoint_is_local(ep), "{ep}");
        }
    }
}
