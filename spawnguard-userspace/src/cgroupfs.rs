//! The cgroup2 hierarchy as seen from userspace: where it is mounted, cgroup ids, instance
//! directories; and the pseudo filesystems spawnguard needs.

use std::{
    ffi::CString,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error(
        "no cgroup2 filesystem is mounted; mount one (e.g. `mount -t cgroup2 none \
         /sys/fs/cgroup`) or boot with systemd.unified_cgroup_hierarchy"
    )]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this host's cgroup2 has no {file} (it needs {needs})")]
    Missing {
        file: &'static str,
        needs: &'static str,
    },
    #[error("cannot mount {fs} at {path}: {source}")]
    Mount {
        fs: &'static str,
        path: &'static str,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup2 mount: its mount point, and the path of its root inside the hierarchy (not `/`
/// when a container sees only part of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2 {
    pub mount: PathBuf,
    pub root: PathBuf,
}

impl Cgroup2 {
    pub fn discover() -> Result<Self, CgroupError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
        Self::from_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
    }

    /// Picks the first cgroup2 mount of a mountinfo table.
    pub fn from_mountinfo(text: &str) -> Option<Self> {
        text.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = left.split_whitespace().collect();
            Some(Self {
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount: PathBuf::from(unescape(fields.get(4)?)),
            })
        })
    }

    pub fn dir(&self, relative: &str) -> PathBuf {
        self.mount.join(relative)
    }

    /// The kernel's `cgroup->level` of a directory `relative` to the mount (the hierarchy root
    /// is level 0).
    pub fn level(&self, relative: &str) -> u32 {
        let root_depth = self
            .root
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count();
        (root_depth + relative.split('/').filter(|c| !c.is_empty()).count()) as u32
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(b as char);
                continue;
            }
            out.push(c);
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// A cgroup's id: the inode number of its directory on the cgroup2 mount.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    Ok(std::fs::metadata(dir).map_err(io(dir))?.ino())
}

pub fn ensure_dir(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir).map_err(io(dir))
}

/// Moves a process (all its threads) into a cgroup.
pub fn move_process(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(io(&procs))
}

/// A cgroup and every cgroup below it.
pub fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let below = children(&out[i]);
        out.extend(below);
        i += 1;
    }
    out
}

/// Process ids in one cgroup (not below it).
pub fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `FILEID_KERNFS`: a kernfs file handle is the node's 64-bit id, which is the cgroup id.
const FILEID_KERNFS: i32 = 0xfe;

/// The path of the cgroup with id `id` on the hierarchy mounted at `mount` (an open directory
/// of that mount): `open_by_handle_at` with a kernfs handle, O(1) whatever the number of
/// cgroups. None when the cgroup is gone, or where the call is not allowed (it needs
/// CAP_DAC_READ_SEARCH).
pub fn path_of_id(mount: &std::fs::File, id: u64) -> Option<PathBuf> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    let handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: the handle is a `struct file_handle` with its 8 bytes of payload; the kernel only
    // reads it. A returned descriptor is new and owned here.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &raw const handle,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: as above: a new descriptor, owned from here on (closed on drop).
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}

/// Child directories of a cgroup (the instances of a type directory).
pub fn children(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Freezes every task of a cgroup subtree (`cgroup.freeze`, cgroup v2, kernel >= 5.2).
pub fn freeze(dir: &Path) -> Result<(), CgroupError> {
    write_control(dir, "cgroup.freeze", "1", "kernel >= 5.2")
}

/// Kills every task of a cgroup subtree: `cgroup.kill` (kernel >= 5.14), or before it, freezes
/// the subtree (nothing in it forks any more), SIGKILLs each of its processes (a frozen task
/// still dies of it) and thaws it.
pub fn kill(dir: &Path) -> Result<(), CgroupError> {
    match write_control(dir, "cgroup.kill", "1", "kernel >= 5.14") {
        Err(CgroupError::Missing { .. }) => {}
        done => return done,
    }
    freeze(dir)?;
    for cgroup in subtree(dir) {
        for pid in procs(&cgroup) {
            // SAFETY: kill(2) has no memory preconditions. The pid was read from a frozen
            // cgroup: its process cannot exit (and its pid be reused) before this signal.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    write_control(dir, "cgroup.freeze", "0", "kernel >= 5.2")
}

/// Kills every task of a cgroup subtree and removes its directories (waiting up to 2 s for
/// the tasks to be gone: rmdir needs an empty cgroup).
pub fn kill_and_remove(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    let _ = kill(dir);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut cgroups = subtree(dir);
    // Deepest first.
    cgroups.reverse();
    for c in cgroups {
        loop {
            match std::fs::remove_dir(&c) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if std::time::Instant::now() > deadline => return Err(io(&c)(e)),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
    Ok(())
}

fn write_control(
    dir: &Path,
    file: &'static str,
    value: &str,
    needs: &'static str,
) -> Result<(), CgroupError> {
    let path = dir.join(file);
    if !path.exists() {
        return Err(CgroupError::Missing { file, needs });
    }
    std::fs::write(&path, value).map_err(io(&path))
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;
pub const BPF_FS: &str = "/sys/fs/bpf";
pub const TRACEFS: &str = "/sys/kernel/tracing";

fn fs_magic(path: &str) -> Option<i64> {
    let c = CString::new(path).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

fn mount(fs: &'static str, path: &'static str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Mount { fs, path, source };
    std::fs::create_dir_all(path).map_err(err)?;
    let (src, target) = (CString::new(fs).unwrap(), CString::new(path).unwrap());
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

const SECURITYFS_MAGIC: i64 = 0x7363_6673;
pub const SECURITYFS: &str = "/sys/kernel/security";

/// Mounts securityfs (where the kernel lists its active LSMs) if it is missing; returns
/// whether it mounted it.
pub fn ensure_securityfs() -> Result<bool, CgroupError> {
    if fs_magic(SECURITYFS) == Some(SECURITYFS_MAGIC) {
        return Ok(false);
    }
    mount("securityfs", SECURITYFS)?;
    Ok(true)
}

/// Whether bpffs and tracefs are mounted where spawnguard uses them.
pub fn pseudo_filesystems() -> [(&'static str, bool); 2] {
    [
        (BPF_FS, fs_magic(BPF_FS) == Some(BPF_FS_MAGIC)),
        (TRACEFS, fs_magic(TRACEFS) == Some(TRACEFS_MAGIC)),
    ]
}

/// Mounts bpffs (for pinning) and tracefs where missing; returns what it mounted.
pub fn ensure_pseudo_filesystems() -> Result<Vec<&'static str>, CgroupError> {
    let mut mounted = Vec::new();
    if fs_magic(BPF_FS) != Some(BPF_FS_MAGIC) {
        mount("bpf", BPF_FS)?;
        mounted.push(BPF_FS);
    }
    if fs_magic(TRACEFS) != Some(TRACEFS_MAGIC) {
        mount("tracefs", TRACEFS)?;
        mounted.push(TRACEFS);
    }
    Ok(mounted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let c = Cgroup2::from_mountinfo(HYBRID).unwrap();
        assert_eq!(c.mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(c.level("agents/devsecops"), 2);
    }

    #[test]
    fn nested_root_and_escapes() {
        let c = Cgroup2::from_mountinfo(
            "1 0 0:1 /kubepods/pod1 /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw",
        )
        .unwrap();
        assert_eq!(c.mount, PathBuf::from("/sys/fs/cgroup x"));
        assert_eq!(c.level("a"), 3);
        assert!(Cgroup2::from_mountinfo("1 0 0:1 / /x rw - ext4 /dev/vda rw").is_none());
    }
}
