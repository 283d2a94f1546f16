//! Which files and directories the daemon may trust, checked the way `sshd` checks its keys: a
//! policy file a non-root user could change would let that user lift every agent's limits, and
//! a run directory a non-root user could swap would let it stand in for the control socket.
//!
//! Every component of the path, from `/` down, must be owned by root and not writable by group
//! or others. A directory that is world-writable but sticky (`/tmp`) is fine on the way: others
//! may add entries there, but not remove or rename root's. So is a directory on a read-only
//! mount (a Kubernetes ConfigMap's is 0777, but mounted read-only).

use std::{
    fs::Metadata,
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

/// Why a path is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {problem}")]
    Untrusted { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn untrusted(path: &Path, problem: impl Into<String>) -> TrustError {
    TrustError::Untrusted {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn lstat(path: &Path) -> Result<Metadata, TrustError> {
    std::fs::symlink_metadata(path).map_err(|source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `path` is on a read-only mount (as a Kubernetes ConfigMap is): nobody can change it
/// through this mount, whatever its owner and mode say (a ConfigMap's directory is 0777).
fn read_only_mount(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a NUL-terminated path and a buffer of the right type, filled on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statvfs filled it (rc 0).
    rc == 0 && unsafe { st.assume_init() }.f_flag & libc::ST_RDONLY != 0
}

/// The problem with one component (`last`: the file itself, where a sticky world-writable
/// directory is no excuse), if any.
fn problem(meta: &Metadata, last: bool) -> Option<String> {
    if meta.uid() != 0 {
        return Some(format!(
            "owned by uid {}, not root: a non-root user can change it",
            meta.uid()
        ));
    }
    if meta.file_type().is_symlink() {
        // A symlink's own mode means nothing; its target is checked on the resolved path.
        return None;
    }
    let mode = meta.permissions().mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (last || !meta.is_dir() || !sticky) {
        return Some(format!(
            "writable by group or others (mode {:04o}): a non-root user can change it",
            mode & 0o7777
        ));
    }
    None
}

/// Checks `path` and every directory above it, as written and as resolved.
fn check_chain(path: &Path) -> Result<(), TrustError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| TrustError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .join(path)
    };
    let resolved = std::fs::canonicalize(&absolute).map_err(|source| TrustError::Io {
        path: absolute.clone(),
        source,
    })?;
    for chain in [&absolute, &resolved] {
        let mut at = PathBuf::new();
        let parts: Vec<Component> = chain.components().collect();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            if matches!(part, Component::CurDir | Component::ParentDir) {
                continue;
            }
            let meta = lstat(&at)?;
            if let Some(p) = problem(&meta, i + 1 == parts.len()) {
                // A directory on a read-only mount is let through (a ConfigMap's); a file never
                // is: a read-only bind mount of a file others can write on the host is theirs.
                if !meta.is_dir() || !read_only_mount(&at) {
                    return Err(untrusted(&at, p));
                }
            }
        }
    }
    Ok(())
}

/// Refuses a policy file that a non-root user could write, or replace through a directory on
/// its path.
pub fn check_policy_file(path: &Path) -> Result<(), TrustError> {
    check_chain(path)?;
    let meta = std::fs::metadata(path).map_err(|source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(untrusted(path, "not a regular file"));
    }
    Ok(())
}

/// Creates `dir` (root's, mode 0755) when missing, and refuses it when it is a symlink, not a
/// directory, not root's, or writable by others: the control socket and the daemon's lock live
/// there, and a directory someone else could swap would let them stand in for both.
pub fn ensure_root_dir(dir: &Path) -> Result<(), TrustError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // mkdir never follows a symlink at the last component: a symlink planted since
            // makes it fail with EEXIST, and the checks below refuse it.
            match std::fs::DirBuilder::new().mode(0o755).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(TrustError::Io {
                        path: dir.to_path_buf(),
                        source,
                    })
                }
            }
        }
        Err(source) => {
            return Err(TrustError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
        Ok(_) => {}
    }
    let meta = lstat(dir)?;
    if meta.file_type().is_symlink() {
        return Err(untrusted(
            dir,
            "is a symlink: refusing a run directory that can point elsewhere; remove it",
        ));
    }
    if !meta.is_dir() {
        return Err(untrusted(dir, "is not a directory; remove it"));
    }
    check_chain(dir).map_err(|e| match e {
        TrustError::Untrusted { path, problem } => TrustError::Untrusted {
            path,
            problem: format!("{problem}; the run directory must be root's and mode 0755 or 0700"),
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(mode: u32) -> (tempdir::Dir, Metadata) {
        let d = tempdir::Dir::new();
        std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(mode)).unwrap();
        let m = std::fs::symlink_metadata(&d.0).unwrap();
        (d, m)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("sg-trust-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_symlink_is_followed_to_where_its_target_lives() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let d = tempdir::Dir::new();
        std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (safe, open) = (d.0.join("safe"), d.0.join("open"));
        for (dir, mode) in [(&safe, 0o755), (&open, 0o777)] {
            std::fs::create_dir(dir).unwrap();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::write(open.join("policy.toml"), "").unwrap();
        std::fs::write(safe.join("real.toml"), "").unwrap();
        std::os::unix::fs::symlink(open.join("policy.toml"), safe.join("policy.toml")).unwrap();
        std::os::unix::fs::symlink("real.toml", safe.join("link.toml")).unwrap();
        let err = check_policy_file(&safe.join("policy.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "{}: writable by group or others (mode 0777)",
                open.display()
            )),
            "{err}"
        );
        check_policy_file(&safe.join("link.toml")).unwrap();
    }

    #[test]
    fn a_sticky_world_writable_directory_is_fine_on_the_way_only() {
        // These only say something when the test runs as root (the owner check comes first).
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let (_d, m) = meta_of(0o1777);
        assert_eq!(problem(&m, false), None);
        assert!(problem(&m, true).is_some());
        let (_d, m) = meta_of(0o777);
        assert!(problem(&m, false).unwrap().contains("mode 0777"));
        let (_d, m) = meta_of(0o775);
        assert!(problem(&m, false).is_some());
        let (_d, m) = meta_of(0o755);
        assert_eq!(problem(&m, false), None);
    }
}
