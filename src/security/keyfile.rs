//! Secret key files: the key rule (owner, mode, group), who the process runs as, and reading
//! a key under that rule.

use super::{curve_public, z85_decode_key, KeyPair, SECURITY_DOC};
use std::fs;
use std::path::{Path, PathBuf};

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
    // SAFETY: a plain C struct of integers and pointers: all zeroes is a valid value.
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
    // SAFETY: a plain C struct of integers and pointers: all zeroes is a valid value.
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
    // SAFETY: a plain C struct of integers and pointers: all zeroes is a valid value.
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
         PREFIX` (writes PREFIX.key) or correct the path"
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
