//! Live instances for the benches: one sleeping task in each of `n` instance directories, so
//! each holds an entry of the kernel's instance map (idle directories hold none). The map's
//! capacity is counted in these.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// Instance-map entries a bench keeps free at "capacity" for the instances its cases make.
pub const KEEP_FREE: usize = 16;

/// The tasks and their directories; killed by PID, reaped and removed when dropped.
pub struct LiveInstances {
    pids: Vec<libc::pid_t>,
    dirs: Vec<PathBuf>,
}

impl LiveInstances {
    /// `n` directories `live-0`.. under `parent`, each with a task forked from this process
    /// that moved itself in (the migration admits the instance) and sleeps.
    pub fn start(parent: &Path, n: usize) -> Self {
        let mut pipe = [0; 2];
        // SAFETY: `pipe` is a valid array of two fds to fill.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0, "pipe");
        let mut live = Self {
            pids: Vec::with_capacity(n),
            dirs: Vec::with_capacity(n),
        };
        for i in 0..n {
            let dir = parent.join(format!("live-{i}"));
            fs::create_dir_all(&dir).unwrap();
            let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
            // SAFETY: the child makes only system calls (open, write, pause) on memory prepared
            // before the fork, never returns, and is killed by PID when this is dropped.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above; "0" moves the writer itself.
                unsafe {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    let moved = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::write(pipe[1], [u8::from(moved)].as_ptr().cast(), 1);
                    loop {
                        libc::pause();
                    }
                }
            }
            assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
            live.pids.push(pid);
            live.dirs.push(dir);
        }
        // SAFETY: our own write end, no longer needed here.
        unsafe { libc::close(pipe[1]) };
        let mut moved = 0;
        for _ in 0..n {
            let mut b = 0u8;
            // SAFETY: a one-byte read into `b`.
            let r = unsafe { libc::read(pipe[0], (&raw mut b).cast(), 1) };
            assert_eq!(r, 1, "a live instance's task did not report");
            moved += usize::from(b);
        }
        // SAFETY: our own read end.
        unsafe { libc::close(pipe[0]) };
        assert_eq!(moved, n, "tasks that moved into their instance");
        live
    }
}

impl Drop for LiveInstances {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: a task this process forked and has not reaped: its PID is still its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for &pid in &self.pids {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }
}
