//! Privileged end-to-end tests of the daemon as a systemd service, without systemd: a unix
//! datagram socket of the test's own stands in for systemd's `NOTIFY_SOCKET` (READY=1 only once
//! the enforcer holds, watchdog pings that stop when the daemon stops turning), and a private
//! mount namespace stands in for a hardened unit's (nothing is mounted there).

use std::{
    ffi::OsStr,
    fs,
    os::unix::{net::UnixDatagram, process::CommandExt},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use spawnguard_tests::*;

/// The messages the daemon sends to the test's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sg-{name}-{}.sock", std::process::id()));
        let _ = fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        Self { socket, path }
    }

    /// The next message, if one comes within `wait`.
    fn recv(&self, wait: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one has `line` (as a whole line), within `timeout`; all of them, that one
    /// last, or None on time-out.
    fn until(&self, line: &str, timeout: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(m) = self.recv(left) {
                let done = m.lines().any(|l| l == line);
                seen.push(m);
                if done {
                    return Some(seen);
                }
            }
        }
        None
    }

    /// Throws away what is queued.
    fn drain(&self) {
        while self.recv(Duration::from_millis(1)).is_some() {}
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether the process is stopped (state `T` in /proc/PID/stat).
fn stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

#[test]
fn ready_only_once_enforcing_and_watchdog_pings_only_while_the_daemon_turns() {
    if !privileged() {
        return;
    }
    let notify = NotifySocket::bind("notify");
    let (rel, tree) = test_type("notify");
    let started = Instant::now();
    // WatchdogSec=2s: a ping every second.
    let mut daemon = Daemon::spawn_with_env(
        &policy("nt", &rel, "max_tasks = 10"),
        &[
            ("NOTIFY_SOCKET", notify.path.as_os_str()),
            ("WATCHDOG_USEC", OsStr::new("2000000")),
        ],
    )
    .unwrap();

    // READY=1, first of all: nothing else is announced before it.
    let before = notify
        .until("READY=1", Duration::from_secs(180))
        .unwrap_or_else(|| panic!("no READY=1: {}", daemon.log_text()));
    let ready_after = started.elapsed();
    // A bomb forked the moment `systemctl start` would return is held.
    let bomb = exec_bomb("nt", "i1", &["fork", "2000", "20000", "1500"])
        .spawn()
        .unwrap();
    assert_eq!(before.len(), 1, "messages before READY=1: {before:?}");
    assert!(
        before[0]
            .lines()
            .any(|l| l.starts_with("STATUS=enforcing 1 type with backend ")),
        "{before:?}"
    );
    assert!(
        Path::new(PIN_DIR).exists(),
        "READY=1 before {PIN_DIR} was pinned"
    );
    // The control socket answers (`policy show` asks the daemon only).
    let shown = cli(&["policy", "show"]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("max_tasks = 10"),
        "{shown:?}"
    );
    let most = max_held(
        &tree.root.join("i1"),
        Duration::from_millis(1500),
        10,
        false,
    );
    assert!(
        most <= 10,
        "a bomb right after READY=1 held {most} tasks, budget 10"
    );
    assert!(most >= 8, "the bomb never pressed on its budget ({most})");
    bomb.wait_with_output().unwrap();

    // Pings keep coming while every loop turns (counted from now: some came during the bomb).
    notify.drain();
    let pings_from = Instant::now();
    for n in 0..2 {
        assert!(
            notify
                .until("WATCHDOG=1", Duration::from_secs(20))
                .is_some(),
            "watchdog ping {n} missing: {}",
            daemon.log_text()
        );
    }
    let two_pings = pings_from.elapsed();

    // A stopped daemon stops pinging (systemd would restart it)...
    daemon.signal(libc::SIGSTOP);
    assert!(wait_for(Duration::from_secs(10), || stopped(daemon.pid())));
    notify.drain();
    let silence = Duration::from_secs(3);
    let heard = notify.recv(silence);
    assert_eq!(heard, None, "a stopped daemon pinged");
    // ...and pings again once it turns again.
    daemon.signal(libc::SIGCONT);
    assert!(
        notify
            .until("WATCHDOG=1", Duration::from_secs(20))
            .is_some(),
        "no ping after SIGCONT: {}",
        daemon.log_text()
    );

    // A clean stop says so.
    let status = daemon.stop().unwrap();
    assert!(status.success(), "{status}");
    let last = notify.until("STOPPING=1", Duration::from_secs(5));
    assert!(last.is_some(), "no STOPPING=1");
    eprintln!(
        "READY=1 after {ready_after:?}; 2 pings in {two_pings:?}; whole test {:?}",
        started.elapsed()
    );
}

/// The mount points of a mountinfo table.
fn mounts_at(info: &str, point: &str) -> usize {
    info.lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(point))
        .count()
}

#[test]
fn outside_the_host_mount_namespace_bpffs_is_not_mounted_but_named() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("mntns");
    let host_before = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let policy_file = write_policy("mntns", &policy("mn", &rel, "max_tasks = 10"));
    let mut cmd = Command::new(spawnguard_bin());
    cmd.args(["run", "--backend", "auto", "--no-pin", "--policy"])
        .arg(&policy_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the child only makes raw system calls on constant,
    // NUL-terminated strings (no allocation, no locks): a mount namespace of its own, whose
    // mounts no longer propagate to the host's, without the host's bpffs.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            let none = c"none";
            if libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // EINVAL when nothing is mounted there: just as good.
            libc::umount2(c"/sys/fs/bpf".as_ptr(), libc::MNT_DETACH);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let exited = wait_for(Duration::from_secs(60), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited, "the daemon ran in a private mount namespace: {err}");
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("mount the host's bpffs at /sys/fs/bpf"),
        "no sentence naming what to mount: {err}"
    );
    let host_after = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for point in ["/sys/fs/bpf", "/sys/kernel/tracing"] {
        assert_eq!(
            mounts_at(&host_before, point),
            mounts_at(&host_after, point),
            "the host's mounts at {point} changed"
        );
    }
    eprintln!("refused in {:?}: {}", started.elapsed(), err.trim());
}

/// Capability names in their kernel order (`CAP_CHOWN` is 0).
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capabilities the systemd unit keeps (`CapabilityBoundingSet=`), as numbers.
fn unit_capabilities() -> Vec<u32> {
    // Built in: the guests run this test with no source tree.
    let unit = include_str!("../../deploy/systemd/spawnguard.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= in the unit");
    line.split_whitespace()
        .map(|name| {
            CAPABILITIES
                .iter()
                .position(|c| *c == name)
                .unwrap_or_else(|| panic!("unknown capability {name}")) as u32
        })
        .collect()
}

#[test]
fn the_unit_s_capabilities_are_enough_to_install_enforce_apply_and_serve_the_gate() {
    if !privileged() {
        return;
    }
    let caps = unit_capabilities();
    assert!(!caps.contains(&21), "the unit keeps CAP_SYS_ADMIN");
    // The daemon below runs with this limit too, as systemd sets it (`Daemon::start_bounded`).
    assert!(
        include_str!("../../deploy/systemd/spawnguard.service").contains("\nLimitMEMLOCK=infinity\n"),
        "the unit must keep LimitMEMLOCK=infinity: without CAP_SYS_RESOURCE the daemon cannot raise it"
    );
    // The type directory is created in a cgroup root does not own (a delegated subtree).
    let (rel, tree) = test_type("caps");
    fs::create_dir_all(&tree.root).unwrap();
    std::os::unix::fs::chown(&tree.root, Some(65534), Some(65534)).unwrap();
    let ty = format!("{rel}/t");
    let started = Instant::now();
    let mut daemon = Daemon::start_bounded(
        &policy("ct", &ty, "max_tasks = 10"),
        &["--gate-group", "65534"],
        &caps,
    )
    .unwrap();
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        bounding,
        caps.iter().fold(0u64, |m, c| m | 1 << c),
        "the daemon runs with the unit's bounding set"
    );

    // Enforces: a bomb is held.
    let inst = tree.root.join("t/i1");
    let bomb = exec_bomb("ct", "i1", &["fork", "1500", "20000", "1000"])
        .spawn()
        .unwrap();
    let most = max_held(&inst, Duration::from_millis(1200), 10, false);
    assert!((8..=10).contains(&most), "held {most} tasks, budget 10");
    bomb.wait_with_output().unwrap();

    // Applies a policy (ExecReload=).
    let raised = write_policy("caps-raise", &policy("ct", &ty, "max_tasks = 12"));
    let out = cli(&["policy", "apply", raised.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(type_status("ct")["max_tasks"], 12);

    // Serves the gate to its group (the socket was given to it).
    let gate = as_nobody(&["gate", "ct"]);
    assert_eq!(gate.status.code(), Some(0), "{gate:?}");

    let stopped = daemon.stop().unwrap();
    assert!(stopped.success(), "{stopped}: {}", daemon.log_text());
    eprintln!("in {:?}", started.elapsed());
}
