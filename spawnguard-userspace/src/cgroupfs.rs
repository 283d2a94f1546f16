//! The cgroup2 hierarchy as seen from userspace: where it is mounted, cgroup ids, instance
//! directories; and the pseudo filesystems spawnguard needs.

use std::{
    ffi::{CStr, CString},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
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
    #[error(
        "{path} has no {name}, and spawnguard mounts none outside the host's mount namespace \
         (it would vanish with the namespace): {why}; mount the host's {name} at {path} (on the \
         host: `mount -t {fs} {fs} {path}`; into a container: `-v {path}:{path}:rshared`; a \
         systemd unit: `RequiresMountsFor={path}`)"
    )]
    NotHostNamespace {
        fs: &'static str,
        name: &'static str,
        path: &'static str,
        why: String,
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

/// Child directories of a cgroup (the instances of a type directory); none if it cannot be
/// listed.
pub fn children(dir: &Path) -> Vec<PathBuf> {
    try_children(dir).unwrap_or_default()
}

/// Child directories of a cgroup, or why it cannot be listed.
pub fn try_children(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
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

/// Creates a cgroup directory (and its missing parents); returns whether this call created the
/// directory itself (false: it was already there).
pub fn create_dir(dir: &Path) -> Result<bool, CgroupError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Signals a parent that runs a command in a cgroup ([`run_in`]) relays to it.
pub const RELAYED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// How [`run_in`] failed to start its command. (The OS error is part of the message, not a
/// `source`: an error chain would print it twice.)
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot move the command into {}: {error}", path.display())]
    Join {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot run {program:?}: {error}")]
    Exec {
        program: std::ffi::OsString,
        error: std::io::Error,
    },
    #[error("{what}: {error}")]
    Os {
        what: &'static str,
        error: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |error| RunError::Os { what, error }
}

/// Runs `cmd` as a child process that moves itself into the cgroup `dir` (its own pid written
/// to `cgroup.procs`) before it execs, while this process stays in its own cgroup. Until the
/// child has ended, [`RELAYED_SIGNALS`] sent to this process are relayed to it; the child is
/// SIGKILLed if this process dies first (it cannot relay a SIGKILL). Returns the child's
/// status once it is reaped.
///
/// The relayed signals stay blocked in this process when it returns (one arriving after the
/// child ended is dropped instead of killing this process before its clean-up): call it from
/// a process that exits soon after, on its main thread.
pub fn run_in(dir: &Path, cmd: &mut std::process::Command) -> Result<ExitStatus, RunError> {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let procs_path = dir.join("cgroup.procs");
    let procs = CString::new(procs_path.as_os_str().as_bytes()).map_err(|_| RunError::Join {
        path: procs_path.clone(),
        error: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // One byte from the child on this pipe says the move failed (not the exec): both report
    // their error as an errno through `spawn`.
    let (tag_read, tag_write) = cloexec_pipe().map_err(os("pipe2"))?;
    let tag_fd = std::os::fd::AsRawFd::as_raw_fd(&tag_write);

    // SIGCHLD ignored (inherited from whoever started us) would reap the child behind our back.
    // SAFETY: a zeroed sigaction filled in by the kernel; no handler is installed here.
    let sigchld_ignored = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    };
    if sigchld_ignored {
        // SAFETY: restores the default disposition; no handler involved.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    }
    // Block what is relayed, and SIGCHLD, before the fork: from here on they wait for
    // `sigtimedwait` below (none is lost, none kills this process). The child restores the mask
    // it inherited from our caller before it execs.
    // SAFETY: sigset_t values we own, initialised by sigemptyset/pthread_sigmask.
    let (waited, caller_mask) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in RELAYED_SIGNALS.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        if rc != 0 {
            return Err(RunError::Os {
                what: "pthread_sigmask",
                error: std::io::Error::from_raw_os_error(rc),
            });
        }
        (set, old)
    };
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };

    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (prctl, getppid, open, write, close, signal, pthread_sigmask) on data prepared
    // before the fork: it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            // Dies with this process: a SIGKILL of `spawnguard exec` still ends the command.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Err(e) = join_self(&procs) {
                libc::write(tag_fd, b"j".as_ptr().cast(), 1);
                return Err(e);
            }
            if sigchld_ignored {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &caller_mask, std::ptr::null_mut());
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(tag_write);
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            let mut byte = 0u8;
            // SAFETY: a one-byte read into a local from our own non-blocking pipe.
            let join_failed = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&tag_read),
                    (&raw mut byte).cast(),
                    1,
                )
            } == 1;
            return Err(if join_failed {
                RunError::Join {
                    path: procs_path,
                    error,
                }
            } else {
                RunError::Exec {
                    program: cmd.get_program().to_owned(),
                    error,
                }
            });
        }
    };
    let pid = child.id() as libc::pid_t;
    loop {
        if let Some(status) = child.try_wait().map_err(os("waitpid"))? {
            return Ok(status);
        }
        // SAFETY: a zeroed siginfo_t the kernel fills in; `waited` is initialised above.
        let (sig, code, sender) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            // A bound on each wait: the loop re-checks the child even if a SIGCHLD were lost.
            let timeout = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let sig = libc::sigtimedwait(&waited, &mut info, &timeout);
            (sig, info.si_code, info.si_pid())
        };
        if sig < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(os("sigtimedwait")(e)),
            }
        }
        if sig == libc::SIGCHLD {
            continue;
        }
        // SAFETY: getpgid/getpgrp have no memory preconditions.
        let same_group = unsafe { libc::getpgid(pid) == libc::getpgrp() };
        if relays(sig, code, sender, pid, same_group) {
            // SAFETY: kill(2) has no memory preconditions. The child is not reaped yet
            // (try_wait above saw it unfinished, and only we reap it): its pid is still its own.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Whether [`run_in`] relays signal `sig` (with `code` and `sender` from its siginfo) to its
/// child `child`. Not when the child sent it: that would echo it back. Not a SIGINT or SIGQUIT
/// that the kernel sent (a terminal's ^C or ^\ goes to its whole foreground process group)
/// while the child is in our process group: the child already got it once.
fn relays(
    sig: libc::c_int,
    code: libc::c_int,
    sender: libc::pid_t,
    child: libc::pid_t,
    same_group: bool,
) -> bool {
    // si_pid is only meaningful for signals sent from userspace (si_code <= 0).
    if code <= 0 && sender == child {
        return false;
    }
    !(code == libc::SI_KERNEL && same_group && matches!(sig, libc::SIGINT | libc::SIGQUIT))
}

/// A pipe whose ends close on exec; both ends non-blocking.
fn cloexec_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned from here on (closed on drop).
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`, with raw system
/// calls only (open, write, close): fit to run between fork and exec, as it allocates nothing.
fn join_self(procs: &CStr) -> std::io::Result<()> {
    let mut buf = [0u8; 10];
    // SAFETY: getpid(2) has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    let digits = format_pid(pid, &mut buf);
    // SAFETY: a valid C string; the descriptor is new, ours, and closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes `digits.len()` bytes from a live slice to our descriptor.
    let n = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    // errno is read before close(2) can change it.
    let result = match n {
        n if n == digits.len() as isize => Ok(()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        _ => Err(std::io::Error::from_raw_os_error(libc::EIO)),
    };
    // SAFETY: closes the descriptor opened above, used no more.
    unsafe { libc::close(fd) };
    result
}

/// The decimal digits of `pid`, written into `buf` (no allocation).
fn format_pid(mut pid: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    &buf[start..]
}

/// The exit code a shell reports for a process that ended with `status`: its exit code, or
/// 128 + N when signal N killed it.
pub fn shell_exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 255,
    }
}

/// Why [`remove_empty`] left a cgroup directory in place.
#[derive(Debug)]
pub enum Kept {
    /// Processes still run in it (e.g. ones the command left behind).
    Processes(usize),
    /// It has cgroups of its own.
    Nested(usize),
    /// rmdir still failed with EBUSY when the time was up.
    Busy(Duration),
    /// rmdir failed otherwise.
    Remove(std::io::Error),
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kept::Processes(1) => write!(f, "1 process still runs in it"),
            Kept::Processes(n) => write!(f, "{n} processes still run in it"),
            Kept::Nested(1) => write!(f, "it holds 1 nested cgroup"),
            Kept::Nested(n) => write!(f, "it holds {n} nested cgroups"),
            Kept::Busy(d) => write!(f, "the kernel still had it busy after {d:?}"),
            Kept::Remove(e) => write!(f, "cannot remove it: {e}"),
        }
    }
}

/// Removes a cgroup directory that has no process and no nested cgroup left; keeps any other,
/// and never kills anything. A cgroup whose last task just exited can stay populated (and
/// rmdir fail with EBUSY) for a few ms while the kernel finishes with the task: waits for
/// `populated 0` in its `cgroup.events`, then retries rmdir, both up to `timeout`.
pub fn remove_empty(dir: &Path, timeout: Duration) -> Result<(), Kept> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match children(dir).len() {
            0 => {}
            n => return Err(Kept::Nested(n)),
        }
        match procs(dir).len() {
            0 => {}
            n => return Err(Kept::Processes(n)),
        }
        wait_unpopulated(dir, deadline);
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Kept::Busy(timeout));
                }
                // Populated 0 and still busy (or no cgroup.events to watch): a short pause.
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(Kept::Remove(e)),
        }
    }
}

/// Waits until `cgroup.events` of `dir` says `populated 0`, or `deadline`. The kernel marks a
/// change of that file with POLLPRI; it is re-read every 50 ms anyway.
fn wait_unpopulated(dir: &Path, deadline: Instant) {
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::open(dir.join("cgroup.events")) else {
        return;
    };
    let mut buf = [0u8; 256];
    loop {
        let Ok(n) = file.read_at(&mut buf, 0) else {
            return;
        };
        if !is_populated(&buf[..n]) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&file),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = left.min(Duration::from_millis(50)).as_millis().max(1) as libc::c_int;
        // SAFETY: one pollfd we own, for a descriptor that lives until the end of this function.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

/// Whether a `cgroup.events` text says `populated 1`.
fn is_populated(events: &[u8]) -> bool {
    events
        .split(|b| *b == b'\n')
        .any(|line| line.trim_ascii() == b"populated 1")
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

/// Mounts `fs` at `path`, only in the host's mount namespace: in a private one (a systemd
/// service's with `PrivateTmp=` and its kind, a container's) the mount, and any pins in it,
/// would vanish with the namespace.
fn mount(fs: &'static str, path: &'static str) -> Result<(), CgroupError> {
    crate::host::in_host_mount_namespace().map_err(|why| CgroupError::NotHostNamespace {
        fs,
        name: if fs == "bpf" { "bpffs" } else { fs },
        path,
        why,
    })?;
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

/// Mounts bpffs (for pinning) and tracefs where missing, in the host's mount namespace only;
/// returns what it mounted.
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

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        use std::os::unix::process::ExitStatusExt;
        // Raw wait(2) statuses: exit code in bits 8-15, killing signal in bits 0-6, 0x80 core.
        assert_eq!(shell_exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(shell_exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(shell_exit_code(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(shell_exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(shell_exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(
            shell_exit_code(ExitStatus::from_raw(libc::SIGSEGV | 0x80)),
            139
        );
    }

    #[test]
    fn pids_formatted_without_allocating() {
        let mut buf = [0u8; 10];
        assert_eq!(format_pid(0, &mut buf), b"0");
        assert_eq!(format_pid(7, &mut buf), b"7");
        assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
        assert_eq!(format_pid(u32::MAX, &mut buf), b"4294967295");
    }

    #[test]
    fn relays_all_but_echoes_and_the_terminals_own_signals() {
        let child = 4242;
        // kill(2) from elsewhere, e.g. a supervisor's SIGTERM.
        assert!(relays(libc::SIGTERM, libc::SI_USER, 1, child, true));
        assert!(relays(libc::SIGINT, libc::SI_USER, 1, child, true));
        // The child signalling us is not echoed back to it.
        assert!(!relays(libc::SIGUSR1, libc::SI_USER, child, child, true));
        // ^C / ^\ reach the whole foreground group: the child got it already...
        assert!(!relays(libc::SIGINT, libc::SI_KERNEL, 0, child, true));
        assert!(!relays(libc::SIGQUIT, libc::SI_KERNEL, 0, child, true));
        // ...unless it left our process group; and a hang-up is relayed anyway.
        assert!(relays(libc::SIGINT, libc::SI_KERNEL, 0, child, false));
        assert!(relays(libc::SIGHUP, libc::SI_KERNEL, 0, child, true));
    }

    #[test]
    fn populated_from_cgroup_events() {
        assert!(is_populated(b"populated 1\nfrozen 0\n"));
        assert!(!is_populated(b"populated 0\nfrozen 0\n"));
        assert!(!is_populated(b""));
    }

    #[test]
    fn waits_for_populated_0_up_to_its_deadline() {
        // A plain file never signals POLLPRI: this relies on the 50 ms re-reads.
        let dir = std::env::temp_dir().join(format!("sg-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = dir.join("cgroup.events");
        std::fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        let start = Instant::now();
        wait_unpopulated(&dir, start + Duration::from_millis(200));
        assert!(start.elapsed() >= Duration::from_millis(200));
        let writer = {
            let events = events.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
            })
        };
        let start = Instant::now();
        wait_unpopulated(&dir, start + Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(2));
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kept_says_why_in_a_few_words() {
        assert_eq!(
            Kept::Processes(3).to_string(),
            "3 processes still run in it"
        );
        assert_eq!(Kept::Processes(1).to_string(), "1 process still runs in it");
        assert_eq!(Kept::Nested(2).to_string(), "it holds 2 nested cgroups");
    }

    #[test]
    fn create_dir_tells_whether_it_created() {
        let base = std::env::temp_dir().join(format!("sg-create-dir-{}", std::process::id()));
        let dir = base.join("type").join("instance");
        assert!(create_dir(&dir).unwrap());
        assert!(!create_dir(&dir).unwrap());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
