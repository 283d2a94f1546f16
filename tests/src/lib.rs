//! Helpers for the privileged end-to-end tests: a real daemon with a test policy, throw-away
//! cgroups that are killed and removed even when a test fails, and exact task counts read from
//! the kernel's own cgroup files.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod podman;

/// Every backend; which of them run depends on the kernel (`backend_runs_here`).
pub const BACKENDS: [&str; 3] = ["lsm", "kill", "kill-compat"];

/// Whether `backend` can run on this kernel: the comma-separated list in `SG_TEST_BACKENDS`
/// when set (the vm-test guests set it), else what `spawnguard doctor` finds here.
pub fn backend_runs_here(backend: &str) -> bool {
    static HERE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    HERE.get_or_init(|| {
        if let Ok(list) = std::env::var("SG_TEST_BACKENDS") {
            return list.split(',').map(|b| b.trim().to_owned()).collect();
        }
        let out = Command::new(spawnguard_bin())
            .args(["doctor", "--output", "json"])
            .output()
            .expect("run spawnguard doctor");
        let r: Value = serde_json::from_slice(&out.stdout).expect("doctor's JSON");
        let ok = |name: &str| {
            r["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == name && c["level"] == "ok")
        };
        let mut here = vec!["kill-compat".to_owned()];
        if ok("kfunc") {
            here.push("kill".into());
        }
        if ok("bpf lsm programs") {
            here.push("lsm".into());
        }
        here
    })
    .iter()
    .any(|b| b == backend)
}

/// A backend this kernel cannot run: `run --backend` refuses it with one line that says why,
/// and leaves nothing loaded.
pub fn assert_backend_refused(backend: &str) {
    uninstall();
    let out = Command::new(spawnguard_bin())
        .args(["run", "--no-pin", "--backend", backend])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--backend {backend} ran: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("spawnguard: ") && last.contains(&format!("--backend {backend} needs")),
        "{err}"
    );
    assert!(
        !Path::new(PIN_DIR).join("links").exists(),
        "a refused backend left an enforcer behind"
    );
}

/// Runs `test` with `backend` where this kernel has it; elsewhere checks that the backend is
/// refused cleanly (the vm-test guests run it for real).
pub fn with_backend(backend: &str, test: fn(&str)) {
    if !privileged() {
        return;
    }
    if backend_runs_here(backend) {
        test(backend);
    } else {
        assert_backend_refused(backend);
    }
}

/// Runs each named test once per backend (`lsm`, `kill`, `kill-compat`), in modules of those
/// names: for real where this kernel has the backend, else as a check that `run` refuses it
/// cleanly (the vm-test guests run it for real).
#[macro_export]
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod lsm {
            $(#[test] fn $name() { $crate::with_backend("lsm", super::$name); })*
        }
        mod kill {
            $(#[test] fn $name() { $crate::with_backend("kill", super::$name); })*
        }
        mod kill_compat {
            $(#[test] fn $name() { $crate::with_backend("kill-compat", super::$name); })*
        }
    };
}

/// Where the enforcer is pinned (`v` + the map layout version).
pub const PIN_DIR: &str = "/sys/fs/bpf/spawnguard/v4";

/// Whether privileged tests can run here. Under `CI=true` they must: not being able to is a
/// failure, not a skip.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let can = root && Path::new("/sys/kernel/btf/vmlinux").exists();
    if !can {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "privileged end-to-end tests cannot run (need root and kernel BTF), and CI=true"
        );
        eprintln!("skipped: needs root and kernel BTF");
    }
    can
}

fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/release")
}

pub fn spawnguard_bin() -> PathBuf {
    std::env::var_os("SPAWNGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("spawnguard"))
}

pub fn bomb_bin() -> PathBuf {
    std::env::var_os("SG_BOMB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("sg-bomb"))
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// A cgroup subtree owned by a test: on drop every process in it is killed (`cgroup.kill`, or
/// SIGKILL by pid where that file is missing) and every directory removed, deepest first.
pub struct CgroupTree {
    pub root: PathBuf,
}

impl CgroupTree {
    pub fn new(root: PathBuf) -> Self {
        let tree = Self { root };
        tree.clean();
        tree
    }

    fn dirs(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = fs::read_dir(d) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), out);
                    }
                }
            }
            out.push(d.to_path_buf());
        }
        let mut out = Vec::new();
        if self.root.exists() {
            walk(&self.root, &mut out);
        }
        out
    }

    pub fn clean(&self) {
        for d in self.dirs() {
            kill_cgroup(&d);
        }
        for d in self.dirs() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                kill_cgroup(&d);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Kills everything in one cgroup (processes we started: the cgroup is ours).
pub fn kill_cgroup(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in read_ids(&dir.join("cgroup.procs")) {
            // SAFETY: plain kill(2) of a pid in a cgroup only our test created.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

pub fn read_ids(file: &Path) -> Vec<u32> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Every thread id in a cgroup subtree (nested cgroups included), as the kernel lists them.
pub fn subtree_threads(dir: &Path) -> Vec<u32> {
    let mut out = read_ids(&dir.join("cgroup.threads"));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree_threads(&e.path()));
            }
        }
    }
    out
}

/// Every process id in a cgroup subtree.
pub fn subtree_procs(dir: &Path) -> Vec<u32> {
    let mut out = read_ids(&dir.join("cgroup.procs"));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subtree_procs(&e.path()));
            }
        }
    }
    out
}

/// Whether a task can still run user code: not exiting (PF_EXITING) and no SIGKILL pending. A
/// child that the kill backend stopped sits in `cgroup.threads` for a few microseconds with
/// SIGKILL pending; it never runs, so it does not count as held by the instance.
pub fn runnable(tid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{tid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    const PF_EXITING: u64 = 0x4;
    if matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0 {
        return false;
    }
    let Ok(status) = fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    const SIGKILL_BIT: u64 = 1 << 8;
    !status.lines().any(|l| {
        (l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            && u64::from_str_radix(l.split_whitespace().nth(1).unwrap_or("0"), 16)
                .is_ok_and(|m| m & SIGKILL_BIT != 0)
    })
}

/// Tasks of a subtree that hold a slot: runnable now and, when there seem to be more than
/// `limit`, still runnable a moment later. A refused child is visible in `cgroup.threads` from
/// the moment the kernel links it in until it dies; with kill-compat it dies on its first return
/// towards user space, so it can look runnable while it waits for a CPU. Such a child never runs
/// user code and is gone (or has SIGKILL pending) on the second look; a task that was admitted
/// is not (the bombs' admitted tasks live until their hold ends). The second look may take
/// 500 ms: a kill-compat fork bomb's 40 processes never back off (their forks succeed), and a
/// refused child waits behind all of them for its first CPU (CI once saw 66 tasks after 100 ms,
/// budget 40).
pub fn held_tasks(dir: &Path, limit: usize, threads_only: bool) -> usize {
    let mut tids: Vec<u32> = subtree_threads(dir)
        .into_iter()
        .filter(|&t| runnable(t))
        .collect();
    let procs = if threads_only {
        subtree_procs(dir).len()
    } else {
        0
    };
    let deadline = Instant::now() + Duration::from_millis(500);
    while tids.len().saturating_sub(procs) > limit && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        tids.retain(|&t| runnable(t));
    }
    tids.len().saturating_sub(procs)
}

/// Live tasks of a subtree that can still run user code.
pub fn live_tasks(dir: &Path) -> usize {
    subtree_threads(dir)
        .into_iter()
        .filter(|&t| runnable(t))
        .count()
}

/// Threads of a subtree beyond each process's first (spawnguard's "threads").
pub fn live_threads(dir: &Path) -> usize {
    live_tasks(dir).saturating_sub(subtree_procs(dir).len())
}

/// A running `spawnguard run` with a test policy; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    /// The policy file it runs with (rewrite it and send SIGHUP to reload).
    pub policy_file: PathBuf,
}

/// `spawnguard uninstall`: no enforcer left from an earlier test.
pub fn uninstall() {
    let out = Command::new(spawnguard_bin())
        .arg("uninstall")
        .output()
        .expect("run spawnguard uninstall");
    assert!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Daemon {
    /// A daemon that removes its enforcer when it stops (`--no-pin`), after removing any
    /// enforcer left behind: each test starts from nothing.
    pub fn start(policy: &str, backend: &str) -> Result<Self> {
        uninstall();
        Self::launch(policy, &["--backend", backend, "--no-pin"])
    }

    /// `start` with extra `spawnguard run` arguments.
    pub fn start_with_args(policy: &str, backend: &str, extra: &[&str]) -> Result<Self> {
        uninstall();
        let mut all = vec!["--backend", backend, "--no-pin"];
        all.extend_from_slice(extra);
        Self::launch(policy, &all)
    }

    /// `start` with extra `spawnguard run` arguments (the backend `auto` picks).
    pub fn start_with(policy: &str, args: &[&str]) -> Result<Self> {
        uninstall();
        let mut all = vec!["--backend", "auto", "--no-pin"];
        all.extend_from_slice(args);
        Self::launch(policy, &all)
    }

    /// A daemon in the default, pinned mode (the enforcer outlives it); adopts what is pinned.
    pub fn start_pinned(policy: &str) -> Result<Self> {
        Self::launch(policy, &[])
    }

    /// A fresh daemon (`--no-pin`, backend `auto`, after `uninstall`) started with extra
    /// environment variables, returned at once: the caller waits for what it tests.
    pub fn spawn_with_env(policy: &str, env: &[(&str, &std::ffi::OsStr)]) -> Result<Self> {
        uninstall();
        Self::spawn(policy, &["--backend", "auto", "--no-pin"], env)
    }

    /// A fresh daemon (`--no-pin`, backend `auto`, after `uninstall`) holding only the
    /// capabilities numbered in `caps` (its bounding set, with no new privileges: as systemd
    /// runs it with `CapabilityBoundingSet=` and `NoNewPrivileges=yes`).
    pub fn start_bounded(policy: &str, args: &[&str], caps: &[u32]) -> Result<Self> {
        uninstall();
        let mut all = vec!["--backend", "auto", "--no-pin"];
        all.extend_from_slice(args);
        Self::launch_with(policy, &all, &[], Some(caps))
    }

    /// A fresh daemon (`--no-pin`, after `uninstall`) with `args` and extra environment
    /// variables, returned once it is ready.
    pub fn start_with_env(
        policy: &str,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        uninstall();
        let mut all = vec!["--no-pin"];
        all.extend_from_slice(args);
        Self::launch_with(policy, &all, env, None)
    }

    fn launch(policy: &str, args: &[&str]) -> Result<Self> {
        Self::launch_with(policy, args, &[], None)
    }

    fn launch_with(
        policy: &str,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        caps: Option<&[u32]>,
    ) -> Result<Self> {
        let mut daemon = Self::spawn_bounded(policy, args, env, caps)?;
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// A daemon in the pinned mode with extra `spawnguard run` arguments, returned at once (it
    /// may still be installing: the drills kill it there).
    pub fn spawn_pinned(policy: &str, args: &[&str]) -> Result<Self> {
        Self::spawn(policy, args, &[])
    }

    /// Waits until it has written its state file (its enforcer is in place).
    pub fn wait_ready(&mut self) -> Result<()> {
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let state = fs::read_to_string("/run/spawnguard/state.json").unwrap_or_default();
            if serde_json::from_str::<Value>(&state)
                .is_ok_and(|v| v["pid"].as_u64() == Some(pid as u64))
            {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!("the daemon exited ({status}): {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("the daemon did not become ready: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(policy: &str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<Self> {
        Self::spawn_bounded(policy, args, env, None)
    }

    fn spawn_bounded(
        policy: &str,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        caps: Option<&[u32]>,
    ) -> Result<Self> {
        static LAUNCHES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("spawnguard-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let policy_file = dir.join("policy.toml");
        fs::write(&policy_file, policy)?;
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(spawnguard_bin());
        if let Some(keep) = caps {
            use std::os::unix::process::CommandExt;
            let keep = keep.to_vec();
            // SAFETY: between fork and exec the child only calls setrlimit and prctl (no
            // allocation, no locks): as systemd does for the unit, it sets
            // `LimitMEMLOCK=infinity` where it can (kernels before 5.11 charge maps to it, and
            // without CAP_SYS_RESOURCE the daemon cannot raise it), drops every capability not
            // kept from its bounding set (EINVAL past the kernel's last one), then forbids new
            // privileges. Root's exec then gets only these.
            unsafe {
                cmd.pre_exec(move || {
                    let unlimited = libc::rlimit {
                        rlim_cur: libc::RLIM_INFINITY,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    // Raising the hard limit needs CAP_SYS_RESOURCE, which some hosts' own
                    // bounding set lacks (this one's): keep the limit there. Kernels from 5.11
                    // charge maps to the memory cgroup instead.
                    let _ = libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited);
                    for cap in 0..64u32 {
                        if !keep.contains(&cap)
                            && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
                                != 0
                            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("run")
            .args(args)
            .arg("--policy")
            .arg(&policy_file)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(dir.join("daemon.err"))?)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .spawn()
            .with_context(|| format!("starting {}", spawnguard_bin().display()))?;
        Ok(Self {
            child: Some(child),
            log: dir.join("daemon.err"),
            policy_file,
        })
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.as_mut().unwrap().try_wait()?)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGKILL: the daemon dies without any clean-up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the daemon did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// `spawnguard status --output json`.
pub fn status() -> Value {
    let out = Command::new(spawnguard_bin())
        .args(["status", "--output", "json"])
        .output()
        .expect("run spawnguard status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The counts spawnguard holds for the instance at `dir` (zeros when it has no entry).
pub fn instance_counts(dir: &Path) -> (u64, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let id = fs::metadata(dir).map(|m| m.ino()).unwrap_or(0);
    let s = status();
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"].as_u64() == Some(id))
        .map_or((0, 0, 0), |i| {
            (
                i["tasks"].as_u64().unwrap(),
                i["processes"].as_u64().unwrap(),
                i["threads"].as_u64().unwrap(),
            )
        })
}

/// The status entry of one type.
pub fn type_status(name: &str) -> Value {
    status()["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("type {name} in status"))
}

/// `spawnguard exec --type T --instance I -- sg-bomb ARGS...`, with output captured.
pub fn exec_bomb(type_name: &str, instance: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(spawnguard_bin());
    cmd.args(["exec", "--type", type_name, "--instance", instance, "--"])
        .arg(bomb_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Parses `key=value` words of a bomb's report.
pub fn report_value(out: &str, key: &str) -> u64 {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

/// CLOCK_MONOTONIC in ns, as a number processes can share (the bombs' shared deadlines and
/// ledgers): the daemon library's own reading.
pub use spawnguard::host::monotonic_ns;

/// The first value from `rx` that `what` accepts, within `timeout` (None when the sender
/// hangs up or the time is over).
pub fn first_matching<T>(
    rx: &std::sync::mpsc::Receiver<T>,
    timeout: Duration,
    what: impl Fn(&T) -> bool,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(v) if what(&v) => return Some(v),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Polls `f` until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A unique test type directory (relative to the cgroup2 mount) and its guard.
pub fn test_type(name: &str) -> (String, CgroupTree) {
    let rel = format!("spawnguard-test/{name}");
    let tree = CgroupTree::new(cgroup2_mount().join(&rel));
    (rel, tree)
}

/// Writes a policy file for a CLI call (`sg-NAME-PID.toml` in the temp directory).
pub fn write_policy(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sg-{name}-{}.toml", std::process::id()));
    fs::write(&p, text).unwrap();
    p
}

/// A policy with one enforced type.
pub fn policy(name: &str, path: &str, extra: &str) -> String {
    format!("[[type]]\nname = \"{name}\"\npath = \"{path}\"\n{extra}\n")
}

/// Samples `dir` every ~3 ms for `span`; returns the most tasks (or threads) seen that could
/// run user code (see `held_tasks`).
pub fn max_held(dir: &Path, span: Duration, limit: usize, threads_only: bool) -> usize {
    let end = Instant::now() + span;
    let mut most = 0;
    while Instant::now() < end {
        most = most.max(held_tasks(dir, limit, threads_only));
        std::thread::sleep(Duration::from_millis(3));
    }
    most
}

/// `sg-bomb ARGS` started inside the cgroup `dir`, output piped (see `spawn_in`).
pub fn bomb_in(dir: &Path, args: &[&str]) -> std::io::Result<Child> {
    let mut cmd = Command::new(bomb_bin());
    cmd.args(args).stdout(Stdio::piped());
    spawn_in(dir, cmd)
}

/// `cmd` started inside the cgroup `dir`: it joins before exec, so its first instruction
/// already counts there, with no daemon involved. Fails when the kernel refuses the move (a
/// full instance, an open breaker). Stdin and stderr are null, stdout as `cmd` set it.
pub fn spawn_in(dir: &Path, mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let procs = std::ffi::CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(std::io::Error::other)?;
    cmd.stdin(Stdio::null()).stderr(Stdio::null());
    // SAFETY: between fork and exec the child only calls open, write and close on a path
    // prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let wrote = libc::write(fd, c"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if wrote != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// `sg-bomb ARGS` started outside every instance (in the test's own cgroup).
pub fn spawn_outside(args: &[&str]) -> Child {
    Command::new(bomb_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `spawnguard ARGS`, output captured.
pub fn cli(args: &[&str]) -> std::process::Output {
    Command::new(spawnguard_bin()).args(args).output().unwrap()
}

/// `spawnguard ARGS` run as the unprivileged user nobody.
pub fn as_nobody(args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(spawnguard_bin());
    cmd.args(args);
    // SAFETY: only setgid/setuid in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// The body of `GET PATH` from a loopback HTTP server (HTTP/1.0: the server closes when done).
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::Write;
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {answer:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_owned())
}

/// The value of the series `name{labels}` in a text exposition (labels as Prometheus writes
/// them: sorted, e.g. `reason="max_tasks",type="t"`; empty for none).
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().find_map(|l| {
        l.strip_prefix(&series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Series (sample lines) in a text exposition.
pub fn series_count(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// The pids controller's own count for an instance (`pids.current`), the reference spawnguard's
/// counts are checked against. On a hybrid host (pids on cgroup v1) it is a v1 pids cgroup at
/// the instance's relative path, as runc and podman make; on cgroup2 with the pids controller
/// (the qemu guests) it is the instance itself, with `+pids` enabled on the way down from the
/// test's own directories. Removed (after killing what is in it) on drop.
pub struct PidsCgroup {
    /// The directory whose `pids.current` counts the instance.
    pub dir: PathBuf,
    /// Set when `dir` is a v1 directory of our own (tasks must be moved there too).
    v1: Option<CgroupTree>,
}

impl PidsCgroup {
    /// For the instance `relative` to the cgroup2 mount (which must not exist yet on v2: the
    /// controller is enabled on its parents first). Under `CI=true` having neither is a failure.
    pub fn for_instance(relative: &str) -> Self {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let v1 = info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split_whitespace();
            (r.next()? == "cgroup" && r.nth(1)?.split(',').any(|o| o == "pids"))
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        });
        if let Some(mount) = v1 {
            // The test's own subtree (`spawnguard-test/NAME`), cleaned on drop.
            let top: Vec<&str> = relative.split('/').take(2).collect();
            let tree = CgroupTree::new(mount.join(top.join("/")));
            let dir = mount.join(relative);
            fs::create_dir_all(&dir).unwrap();
            return Self {
                dir,
                v1: Some(tree),
            };
        }
        let root = cgroup2_mount();
        let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        assert!(
            controllers.split_whitespace().any(|c| c == "pids"),
            "no pids controller here (neither on cgroup v1 nor on cgroup2's root)"
        );
        // Enable it from the root down to the instance's parent (the guests own their root).
        let mut dir = root.clone();
        let parts: Vec<&str> = relative.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            fs::write(dir.join("cgroup.subtree_control"), "+pids").unwrap();
            dir = dir.join(part);
            fs::create_dir_all(&dir).unwrap();
        }
        fs::write(dir.join("cgroup.subtree_control"), "+pids").unwrap();
        let dir = root.join(relative);
        fs::create_dir_all(&dir).unwrap();
        Self { dir, v1: None }
    }

    /// Whether it is a v1 directory (tasks must be put there too: see `join`).
    pub fn is_v1(&self) -> bool {
        self.v1.is_some()
    }

    /// Puts a process in it too (v1 only; on cgroup2 it is the instance itself).
    pub fn join(&self, pid: u32) {
        if self.v1.is_some() {
            fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }

    /// Moves a process out of it (into `elsewhere`, a directory of the test's own subtree, on
    /// v1).
    pub fn leave(&self, pid: u32, elsewhere: &str) {
        if let Some(tree) = &self.v1 {
            let out = tree.root.join(elsewhere);
            fs::create_dir_all(&out).unwrap();
            fs::write(out.join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }

    pub fn current(&self) -> u64 {
        fs::read_to_string(self.dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}
