//! Facts about the host spawnguard runs on: its kernel, its clock, its processes, and whether
//! this process is root. Read here once, so the commands that need them import no command.

use std::path::Path;

/// Oldest kernel spawnguard runs on (the oldest tested): ring buffers (5.8), BPF LSM (5.7),
/// BTF tracepoints (5.5). Before 5.12 (no atomic fetch/compare-and-swap instructions) it loads
/// the programs that emulate them.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// First kernel with BPF atomic fetch-and-add and compare-and-swap.
pub const ATOMICS_KERNEL: (u32, u32) = (5, 12);

/// The running kernel's release ("6.18.44-fc"), or "unknown".
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// "6.18.44-fc" -> (6, 18)
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether `release` is a kernel older than `version` (a release that does not parse is not).
pub fn kernel_older_than(release: &str, version: (u32, u32)) -> bool {
    kernel_version(release).is_some_and(|v| v < version)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// CLOCK_MONOTONIC in nanoseconds: the kernel's `bpf_ktime_get_ns` time.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether a process with this pid exists (in our pid namespace).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The number Linux gives the first (boot) PID namespace's inode (`PROC_PID_INIT_INO`).
const PID_NS_INIT_INO: u64 = 0xEFFF_FFFC;
/// The number Linux 6.18 and later give the first mount namespace (`MNT_NS_INIT_INO`). Older
/// kernels number every mount namespace from 0xF000_0000 up, so none of theirs has it.
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;

/// Whether this process sees the host's pids: its pid namespace is the initial one.
pub fn in_host_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == PID_NS_INIT_INO)
}

/// Whether this process is in the host's mount namespace, where a file system it mounts is the
/// host's; `Err` says why that cannot be known or why not.
///
/// The host's is the mount namespace of the host's init (pid 1 of the first PID namespace).
/// In a PID namespace of its own (a container's), pid 1 is the container's init, so being in
/// its mount namespace proves nothing: that is "not the host's" too. Reading pid 1's namespace
/// needs ptrace access to it (CAP_SYS_PTRACE when pid 1 has capabilities this process lacks):
/// when it is refused, the answer is "cannot tell", unless the kernel numbers the first mount
/// namespace itself (6.18 and later).
pub fn in_host_mount_namespace() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let ns = |path: &str| {
        std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| format!("cannot read {path} ({e})"))
    };
    let mine = ns("/proc/self/ns/mnt")?;
    if mine.1 == MNT_NS_INIT_INO {
        return Ok(());
    }
    if !in_host_pid_namespace() {
        return Err(
            "this process runs in a PID namespace of its own (a container's), \
                    whose mount namespace is not the host's"
                .into(),
        );
    }
    match ns("/proc/1/ns/mnt") {
        Ok(init) if init == mine => Ok(()),
        Ok(_) => Err("this process runs in a mount namespace other than pid 1's".into()),
        Err(e) => Err(format!(
            "{e}, so this may not be the host's mount namespace"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_test_runs_in_the_host_mount_namespace_or_says_why_not() {
        // Whatever the answer, it is one of the three, and an error says which.
        if let Err(why) = in_host_mount_namespace() {
            assert!(
                why.contains("namespace"),
                "a reason naming the namespace: {why}"
            );
        }
    }

    #[test]
    fn kernel_versions_parse_from_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.10.0-30-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.1"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_older_than("5.4.0", MIN_KERNEL));
        assert!(!kernel_older_than("5.10.0", MIN_KERNEL));
        assert!(kernel_older_than("5.10.0", ATOMICS_KERNEL));
        assert!(!kernel_older_than("5.12.1", ATOMICS_KERNEL));
        assert!(!kernel_older_than("garbage", MIN_KERNEL));
    }
}
