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
    /// The public key (Z85).
    pub public: String,
    /// The secret key (Z85).
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

/// The user and group a process runs as (effective ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id: the one group that may read a secret key besides its owner.
    pub gid: u32,
}

impl RunAs {
    /// The effective ids of this process.
    pub fn current() -> RunAs {
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        unsafe {
            RunAs {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }
}

/// The name of a user id, or the number when it has none.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live storage of the given size; the name is copied out
    // before `buf` goes away.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return name.to_string_lossy().into_owned();
    }
    uid.to_string()
}

/// The name of a group id, or the number when it has none.
pub fn group_name(gid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in user_name.
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
        return name.to_string_lossy().into_owned();
    }
    gid.to_string()
}

/// The id of the group `name`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live storage of the given size.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// Why a secret key file is refused. Every message names the file, the cause and the command
/// that fixes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file does not exist or cannot be opened for another reason than permissions.
    #[error(
        "cannot read secret key file {path}: {reason}; create it with `zgate keygen --out \
         PREFIX` (writes PREFIX.key) or fix backend.secret_key_file"
    )]
    Unavailable {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// A directory on the path cannot be searched by the process.
    #[error(
        "cannot reach secret key file {path}: permission denied on a directory of its path \
         for user {user} (group {group}), which zgate runs as; every directory above the key \
         must be searchable by that user (e.g. `chmod 0755 /etc/zgate`)"
    )]
    Path {
        /// The key file.
        path: PathBuf,
        /// The user this process runs as.
        user: String,
        /// The group this process runs as.
        group: String,
    },
    /// The process may not read the file.
    #[error(
        "cannot read secret key file {path}: permission denied for user {user} (group \
         {group}), which zgate runs as; fix (as root): `{fix}` (see {SECURITY_DOC}, \"Key files\")"
    )]
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// The user this process runs as.
        user: String,
        /// The group this process runs as.
        group: String,
        /// The command that fixes it.
        fix: String,
    },
    /// Owned by a user who is neither root nor the one zgate runs as.
    #[error(
        "secret key file {path} is owned by {owner}: a secret key must be owned by root or by \
         {user}, the user zgate runs as (its owner can read it and widen its mode at any \
         time); fix (as root): `{fix}` (see {SECURITY_DOC}, \"Key files\")"
    )]
    Owner {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        owner: String,
        /// The user this process runs as.
        user: String,
        /// The command that fixes it.
        fix: String,
    },
    /// Permission bits beyond owner read/write and group read (0640).
    #[error(
        "secret key file {path} has mode {mode:04o}: a secret key may be readable and \
         writable by its owner and readable by zgate's own group, nothing more (mode 0640 \
         or stricter: no access for others, no group write); fix (as root): `{fix}` (see \
         {SECURITY_DOC}, \"Key files\")"
    )]
    Mode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The command that fixes it.
        fix: String,
    },
    /// Group-readable by a group other than the one zgate runs as.
    #[error(
        "secret key file {path} is readable by group {group}, which is not {own}, the group \
         zgate runs as: every member of {group} could read the key; fix (as root): `{fix}`{hint} \
         (see {SECURITY_DOC}, \"Key files\")"
    )]
    Group {
        /// The key file.
        path: PathBuf,
        /// The file's group.
        group: String,
        /// The group this process runs as.
        own: String,
        /// The command that fixes it.
        fix: String,
        /// Extra advice (running as root).
        hint: String,
    },
    /// The content is not a Z85 CURVE secret key.
    #[error(
        "secret key file {path}: {problem}; it must hold the 40-character Z85 secret key \
         written by `zgate keygen --out PREFIX` (PREFIX.key)"
    )]
    Format {
        /// The key file.
        path: PathBuf,
        /// What is wrong with the content.
        problem: String,
    },
}

/// The command that puts `path` under the key rule for a process running as `me`: owner root
/// (or the current owner when that is root or `me`), group `me`'s group, mode 0600 when the
/// owner is `me` (it reads as the owner), else 0640 (it reads through the group).
fn key_fix(path: &Path, owner: u32, me: RunAs) -> String {
    let owner = if owner == 0 || owner == me.uid {
        owner
    } else {
        0
    };
    let mode = if owner == me.uid { "0600" } else { "0640" };
    let p = path.display();
    format!(
        "chown {}:{} {p} && chmod {mode} {p}",
        user_name(owner),
        group_name(me.gid)
    )
}

/// The key rule, for a file with permission bits `mode`, owner `uid` and group `gid`, read by
/// a process running as `me`:
/// - owned by root or by `me`'s user;
/// - no permission bits beyond 0640 (owner read/write, group read);
/// - group-readable only when the group is `me`'s group.
///
/// So `root:zgate 0640` (the package's layout) and `zgate:zgate 0600` both pass for the
/// service running as zgate:zgate, and a key readable by anyone else is refused.
pub fn check_key_file(
    path: &Path,
    mode: u32,
    uid: u32,
    gid: u32,
    me: RunAs,
) -> Result<(), KeyFileError> {
    let fix = key_fix(path, uid, me);
    if uid != 0 && uid != me.uid {
        return Err(KeyFileError::Owner {
            path: path.to_path_buf(),
            owner: user_name(uid),
            user: user_name(me.uid),
            fix,
        });
    }
    let mode = mode & 0o7777;
    if mode & !0o640 != 0 {
        return Err(KeyFileError::Mode {
            path: path.to_path_buf(),
            mode,
            fix,
        });
    }
    if mode & 0o040 != 0 && gid != me.gid {
        let hint = if me.uid == 0 {
            "; this check runs as root: the packaged service runs as user zgate, so check \
             what it accepts with `sudo -u zgate zgate check-config /etc/zgate/zgate.toml`"
                .to_string()
        } else {
            String::new()
        };
        return Err(KeyFileError::Group {
            path: path.to_path_buf(),
            group: group_name(gid),
            own: group_name(me.gid),
            fix,
            hint,
        });
    }
    Ok(())
}

/// Reads a secret key file: checks the key rule ([`check_key_file`]) and the format, and
/// derives the public key.
pub fn read_secret_key(path: &Path) -> Result<KeyPair, KeyFileError> {
    use std::os::unix::fs::MetadataExt;
    let me = RunAs::current();
    let unavailable = |e: std::io::Error| KeyFileError::Unavailable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            KeyFileError::Path {
                path: path.to_path_buf(),
                user: user_name(me.uid),
                group: group_name(me.gid),
            }
        } else {
            unavailable(e)
        }
    })?;
    if !meta.is_file() {
        return Err(KeyFileError::Unavailable {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    check_key_file(path, meta.mode(), meta.uid(), meta.gid(), me)?;
    let bytes = fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            KeyFileError::Unreadable {
                path: path.to_path_buf(),
                user: user_name(me.uid),
                group: group_name(me.gid),
                fix: key_fix(path, meta.uid(), me),
            }
        } else {
            unavailable(e)
        }
    })?;
    let bad = |problem: String| KeyFileError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    let secret = text.trim();
    z85_decode_key(secret).map_err(bad)?;
    let public = curve_public(secret).map_err(bad)?;
    Ok(KeyPair {
        public,
        secret: secret.to_string(),
    })
}

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
    fn key_rule_owner_mode_group() {
        let p = Path::new("/x/gw.key");
        // The service: user 990, group 990.
        let svc = RunAs { uid: 990, gid: 990 };
        // The package's layout: root:zgate 0640; the service's own key 0600; read-only.
        assert!(check_key_file(p, 0o100640, 0, 990, svc).is_ok());
        assert!(check_key_file(p, 0o100600, 990, 990, svc).is_ok());
        assert!(check_key_file(p, 0o100400, 990, 5, svc).is_ok());
        assert!(
            check_key_file(p, 0o100600, 0, 0, svc).is_ok(),
            "unreadable, not refused"
        );
        // Others may never read; the group may not write; no exec or special bits.
        for mode in [
            0o100644, 0o100604, 0o100660, 0o100670, 0o100700, 0o104600, 0o100641,
        ] {
            let e = check_key_file(p, mode, 0, 990, svc).unwrap_err();
            assert!(matches!(e, KeyFileError::Mode { .. }), "{mode:o}: {e}");
        }
        // A group other than the service's may not read it.
        let e = check_key_file(p, 0o100640, 0, 100, svc).unwrap_err();
        assert!(matches!(e, KeyFileError::Group { .. }), "{e}");
        assert!(e.to_string().contains("chmod 0640 /x/gw.key"), "{e}");
        // Owned by someone else (who could chmod it).
        let e = check_key_file(p, 0o100600, 1234, 990, svc).unwrap_err();
        assert!(matches!(e, KeyFileError::Owner { .. }), "{e}");
        assert!(e.to_string().contains(SECURITY_DOC), "{e}");
        // The fix keeps an acceptable owner and gives the service's group read access.
        let e = check_key_file(p, 0o100644, 0, 990, svc)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "chown root:{} /x/gw.key && chmod 0640 /x/gw.key",
                group_name(990)
            )),
            "{e}"
        );
        let e = check_key_file(p, 0o100644, 990, 990, svc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("&& chmod 0600 /x/gw.key"), "{e}");
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
