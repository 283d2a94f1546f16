//! Processes the kernel refused after they existed and could not stop itself: without the
//! `bpf_send_signal_task` kfunc (kill-compat; lsm before 6.13), a condemned process dies when
//! one of its threads returns from a system call. A process whose threads make none (spinning in
//! user space, the main thread blocked in `pthread_join`) is killed here, through a pidfd, once
//! it is checked to be the process the kernel condemned and not a later one with its pid. While
//! the daemon is down, such a process runs on (uncounted) until one of its threads makes a
//! system call.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::{events, host};

/// How long a condemned process gets to reach a system call before the daemon kills it.
const GRACE: Duration = Duration::from_millis(200);

/// Processes killed here since the daemon started (`spawnguard_condemned_killed_total`).
static KILLED: AtomicU64 = AtomicU64::new(0);

pub fn killed() -> u64 {
    KILLED.load(Ordering::Relaxed)
}

/// Every 250 ms: kills the condemned processes that outlived `GRACE`.
pub async fn watch(report: tokio::sync::mpsc::Sender<events::EventRecord>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Ok(condemned) = crate::pinned::condemned() else {
            continue;
        };
        let now = host::monotonic_ns();
        for (tgid, c) in condemned.iter().filter_map(Result::ok) {
            if now.saturating_sub(c.since_ns) < GRACE.as_nanos() as u64 {
                continue;
            }
            match kill_checked(tgid, c.start_ns) {
                Ok(true) => {
                    KILLED.fetch_add(1, Ordering::Relaxed);
                    let message = format!(
                        "killed pid {tgid}: refused into instance {} and none of its threads \
                         returned from a system call within {} ms",
                        c.instance,
                        GRACE.as_millis()
                    );
                    tracing::warn!("{message}");
                    let mut record = events::EventRecord::from_daemon(
                        "condemned_killed",
                        "timer",
                        None,
                        message,
                    );
                    record.instance_id = c.instance;
                    let _ = report.try_send(record);
                }
                Ok(false) => {}
                Err(e) => tracing::debug!("condemned pid {tgid}: {e}"),
            }
        }
    }
}

/// Kills `tgid` if it is still the process that started at `start_ns` (ns since boot). Ok(false)
/// when it is gone or another process has its pid.
fn kill_checked(tgid: u32, start_ns: u64) -> std::io::Result<bool> {
    // SAFETY: pidfd_open(pid, flags) takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tgid as libc::pid_t, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: a fresh fd this function owns from here on.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // Checked after the pidfd is open: the pidfd names that process, whatever happens to the pid.
    if start_ticks(tgid)? != Some(ns_to_ticks(start_ns)) {
        return Ok(false);
    }
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal(pidfd, sig, info = NULL, flags = 0) on our own pidfd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
pub(crate) fn start_ticks(pid: u32) -> std::io::Result<Option<u64>> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(parse_start_ticks(&stat))
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The name (field 2) may hold spaces and parentheses: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub(crate) fn ns_to_ticks(ns: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ns / (1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_past_a_name_with_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 \
                    1000 10 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(12345));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn our_own_start_time_matches_the_kernels() {
        let me = std::process::id();
        assert!(start_ticks(me).unwrap().is_some());
        assert_eq!(start_ticks(u32::MAX / 2).unwrap(), None);
    }
}
