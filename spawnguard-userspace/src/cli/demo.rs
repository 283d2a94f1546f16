//! `spawnguard demo`: one minute that shows what spawnguard does. It adds a throw-away type to
//! the running daemon's policy (or starts a daemon of its own), then runs a fork bomb, a thread
//! bomb and a crash-respawn loop in it, showing live that each is contained, and removes
//! everything it made. Every bomb is bounded by a deadline and a cap of its own.

use std::{
    ffi::CString,
    io::{IsTerminal, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use spawnguard_common::BreakerPhase;

use spawnguard::{
    cgroupfs,
    client::{self, Fallback, Route},
    control::{self, PolicyDiff, PolicyShown, Request},
    loader,
    status::{self, InstanceStatus, TypeStatus},
};

pub const DEMO_TYPE: &str = "spawnguard-demo";
const MAX_TASKS: u64 = 32;

/// The throw-away type (appended to the policy in force, or the whole policy of the demo's own
/// daemon).
fn demo_type_toml() -> String {
    format!(
        r#"
# Added by `spawnguard demo` for about a minute; removed when it ends.
[[type]]
name = "{DEMO_TYPE}"
path = "{DEMO_TYPE}"
max_tasks = {MAX_TASKS}
max_threads = {MAX_TASKS}
fork_rate = {{ burst = 200, per_sec = 100.0 }}
[type.breaker]
startup_window = "2s"
failures = 3
within = "30s"
open_for = ["3s", "6s"]
"#
    )
}

/// How long each bomb runs, and the most it may try in total.
const BOMB_TIME: Duration = Duration::from_secs(4);
const FORK_CAP: u64 = 20_000;
const THREAD_CAP: u64 = 2_000;
const RESPAWN_TIME: Duration = Duration::from_secs(12);

/// Where the demo's policy comes from, and how it is undone.
enum Host {
    /// A daemon was running: its policy text, to put back.
    Daemon { old_text: String },
    /// The demo's own daemon (`--no-pin`: it removes the enforcer when it stops).
    Own { child: Child, policy_file: PathBuf },
}

impl Drop for Host {
    fn drop(&mut self) {
        match self {
            Host::Daemon { old_text } => {
                let request = Request::PolicyApply {
                    file: "(policy before spawnguard demo)".into(),
                    text: old_text.clone(),
                };
                match client::daemon_only::<PolicyDiff>(&request) {
                    Ok(_) => say("put the policy back as it was"),
                    Err(e) => eprintln!(
                        "spawnguard demo: could not put the policy back ({e:#}); apply your \
                         policy file again"
                    ),
                }
            }
            Host::Own { child, policy_file } => {
                // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
                let _ = std::fs::remove_file(policy_file);
                say("stopped the demo's daemon (it removed its enforcer)");
            }
        }
    }
}

fn say(line: &str) {
    println!("{line}");
}

/// Kills what is left in a cgroup and removes it, on every way out.
struct DemoCgroup(PathBuf);

impl Drop for DemoCgroup {
    fn drop(&mut self) {
        let _ = cgroupfs::kill_and_remove(&self.0);
    }
}

fn start(exe: &Path) -> Result<Host> {
    // A change to the policy in force: only without a daemon does the demo run its own.
    match client::route(Fallback::WhenNotRunning, control::ask(&Request::PolicyShow))? {
        Route::Daemon(PolicyShown { text: old_text, .. }) => {
            if old_text.contains(&format!("name = \"{DEMO_TYPE}\"")) {
                bail!("the policy in force already has a type {DEMO_TYPE:?}");
            }
            let text = format!("{old_text}\n{}", demo_type_toml());
            client::daemon_only::<PolicyDiff>(&Request::PolicyApply {
                file: "(spawnguard demo)".into(),
                text,
            })?;
            say(&format!(
                "added the throw-away type {DEMO_TYPE} to the running daemon's policy"
            ));
            Ok(Host::Daemon { old_text })
        }
        Route::Pinned(_) => {
            if loader::pin_dir().exists() {
                bail!(
                    "spawnguard is installed ({}) but its daemon is not running: start it \
                     (`spawnguard run`) and run the demo again, which then adds a throw-away \
                     type to its policy for a minute",
                    loader::pin_dir().display()
                );
            }
            let policy_file =
                std::env::temp_dir().join(format!("spawnguard-demo-{}.toml", std::process::id()));
            // Root's alone, whatever the umask: the daemon refuses a policy others can write.
            {
                use std::{io::Write, os::unix::fs::OpenOptionsExt};
                let _ = std::fs::remove_file(&policy_file);
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&policy_file)?
                    .write_all(demo_type_toml().as_bytes())?;
            }
            let log = std::fs::File::create(std::env::temp_dir().join("spawnguard-demo.log"))?;
            let child = Command::new(exe)
                .args(["run", "--no-pin", "--metrics-listen", "off", "--policy"])
                .arg(&policy_file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting the demo's daemon")?;
            let host = Host::Own { child, policy_file };
            // Verifying the programs takes seconds on hardware, over 30 s in emulated guests.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !matches!(control::call(&Request::Status), Ok(Ok(_))) {
                if Instant::now() > deadline {
                    bail!(
                        "the demo's daemon did not come up in 120 s; see {}",
                        std::env::temp_dir().join("spawnguard-demo.log").display()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            say("no daemon was running: started one for the demo (it is removed at the end)");
            Ok(host)
        }
    }
}

fn type_status(s: &status::Status) -> Option<&TypeStatus> {
    s.types.iter().find(|t| t.name == DEMO_TYPE)
}

fn instance(s: &status::Status, id: u64) -> Option<&InstanceStatus> {
    s.instances.iter().find(|i| i.id == id)
}

/// Prints a status line in place on a terminal, as new lines otherwise.
struct Live {
    tty: bool,
    last: Instant,
}

impl Live {
    fn new() -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    fn show(&mut self, line: &str) {
        if self.tty {
            print!("\r\x1b[2K  {line}");
            let _ = std::io::stdout().flush();
        } else if self.last.elapsed() >= Duration::from_secs(1) {
            println!("  {line}");
            self.last = Instant::now();
        }
    }

    fn done(&mut self, line: &str) {
        let line = if interrupted() { "interrupted" } else { line };
        if self.tty {
            println!("\r\x1b[2K  {line}");
        } else {
            println!("  {line}");
        }
    }
}

/// Starts `exe demo-worker KIND` inside `dir` (moved in before it execs, so a refusal stops it
/// before it runs any code of its own).
fn spawn_in(exe: &Path, dir: &Path, kind: &str) -> Result<Child> {
    let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
    let mut cmd = Command::new(exe);
    cmd.args(["demo-worker", kind])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the child only makes raw syscalls (open/write/close) on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn()
        .with_context(|| format!("starting a demo worker in {}", dir.display()))
}

fn fork_bomb(exe: &Path, type_dir: &Path) -> Result<()> {
    say(&format!(
        "\n1. fork bomb: every process forks as fast as it can for {} s (at most {FORK_CAP} \
         forks); the type allows {MAX_TASKS} tasks per instance",
        BOMB_TIME.as_secs()
    ));
    let dir = type_dir.join("fork-bomb");
    cgroupfs::ensure_dir(&dir)?;
    let _cleanup = DemoCgroup(dir.clone());
    let id = cgroupfs::cgroup_id(&dir)?;
    let before = status::snapshot()?;
    let denied0 = type_status(&before).map_or(0, |t| t.denied.total());
    let mut child = spawn_in(exe, &dir, "fork")?;
    let mut live = Live::new();
    let (mut peak, mut denied) = (0, 0);
    let end = Instant::now() + BOMB_TIME + Duration::from_millis(500);
    while Instant::now() < end && !interrupted() {
        let s = status::snapshot()?;
        let tasks = instance(&s, id).map_or(0, |i| i.tasks);
        peak = peak.max(tasks);
        denied = type_status(&s).map_or(0, |t| t.denied.total()) - denied0;
        live.show(&format!(
            "tasks {tasks:>3}/{MAX_TASKS}   forks denied {denied:>6}   (peak {peak})"
        ));
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = cgroupfs::kill(&dir);
    let _ = child.wait();
    live.done(&format!(
        "contained: {denied} forks denied, never more than {peak} tasks (budget {MAX_TASKS})"
    ));
    Ok(())
}

fn thread_bomb(exe: &Path, type_dir: &Path, backend: &str) -> Result<()> {
    say(&format!(
        "\n2. thread bomb: one process starts a thread every 40 ms (at most {THREAD_CAP}); the \
         type allows {MAX_TASKS} per instance"
    ));
    let dir = type_dir.join("thread-bomb");
    cgroupfs::ensure_dir(&dir)?;
    let _cleanup = DemoCgroup(dir.clone());
    let id = cgroupfs::cgroup_id(&dir)?;
    let mut child = spawn_in(exe, &dir, "threads")?;
    let mut live = Live::new();
    let mut peak = 0;
    let end = Instant::now() + BOMB_TIME;
    let mut status = None;
    while Instant::now() < end && !interrupted() {
        let s = status::snapshot()?;
        let threads = instance(&s, id).map_or(0, |i| i.threads);
        peak = peak.max(threads);
        live.show(&format!("threads {threads:>3}/{MAX_TASKS}   (peak {peak})"));
        if let Some(st) = child.try_wait()? {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = cgroupfs::kill(&dir);
    let status = match status {
        Some(s) => s,
        None => child.wait()?,
    };
    let how = match std::os::unix::process::ExitStatusExt::signal(&status) {
        Some(9) => format!(
            "the {backend} backend cannot fail a thread alone, so the process was killed at \
             its first thread over budget"
        ),
        _ => format!("the bomb ended ({status})"),
    };
    live.done(&format!(
        "contained: seen at up to {peak} threads (budget {MAX_TASKS}); {how}"
    ));
    Ok(())
}

fn respawn_loop(exe: &Path, type_dir: &Path) -> Result<()> {
    say(&format!(
        "\n3. crash-respawn loop: a supervisor relaunches a worker that crashes at start-up, \
         as fast as it can, for {} s; the type's breaker opens after 3 start-up failures \
         (open 3 s, then 6 s; one probe in between)",
        RESPAWN_TIME.as_secs()
    ));
    // Start from a closed breaker with no failures counted (the thread bomb above ended within
    // the start-up window, which counts as a start-up failure).
    spawnguard::breaker::close(DEMO_TYPE)?;
    let (mut launched, mut ran, mut refused) = (0u64, 0u64, 0u64);
    let mut live = Live::new();
    let end = Instant::now() + RESPAWN_TIME;
    let mut states = Vec::<String>::new();
    while Instant::now() < end && !interrupted() {
        launched += 1;
        let dir = type_dir.join(format!("respawn-{launched}"));
        cgroupfs::ensure_dir(&dir)?;
        let cleanup = DemoCgroup(dir.clone());
        let status = spawn_in(exe, &dir, "crash")?.wait()?;
        // Exit code 3: the worker ran (and crashed); SIGKILL: refused before it ran.
        if status.code() == Some(3) {
            ran += 1;
        } else {
            refused += 1;
        }
        drop(cleanup);
        let s = status::snapshot()?;
        let breaker =
            type_status(&s)
                .and_then(|t| t.breaker.as_ref())
                .map_or("-".to_owned(), |b| match b.retry_in_seconds {
                    Some(r) if b.state == BreakerPhase::Open.name() => {
                        format!("open, probe in {r:.1} s")
                    }
                    _ => b.state.clone(),
                });
        let state = breaker.split(',').next().unwrap_or_default().to_owned();
        if states.last() != Some(&state) {
            states.push(state);
        }
        live.show(&format!(
            "launches {launched:>5}   ran {ran:>2}   refused {refused:>5}   breaker {breaker}"
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    live.done(&format!(
        "contained: {launched} launches, only {ran} ran (3 failures, then one probe per open \
         period); breaker went {}",
        states.join(" -> ")
    ));
    Ok(())
}

/// Set by SIGINT/SIGTERM: the scenes stop and everything is cleaned up as on a normal end.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn run() -> Result<()> {
    loader::preflight()?;
    // Ctrl-C must not leave the throw-away type in the operator's policy.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let exe = std::env::current_exe().context("finding the spawnguard binary")?;
    let host = start(&exe)?;
    let state =
        loader::DaemonState::read().ok_or_else(|| anyhow!("the daemon wrote no state file"))?;
    let type_dir = state
        .types
        .iter()
        .find(|t| t.name == DEMO_TYPE)
        .map(|t| t.dir.clone())
        .ok_or_else(|| anyhow!("the daemon did not take the demo type"))?;
    let backend = state.backend.name();
    // A breaker left open by an earlier demo would spoil this one.
    let _ = spawnguard::breaker::close(DEMO_TYPE);
    let scene = |f: &dyn Fn() -> Result<()>| if interrupted() { Ok(()) } else { f() };
    let result = scene(&|| fork_bomb(&exe, &type_dir))
        .and_then(|()| scene(&|| thread_bomb(&exe, &type_dir, backend)))
        .and_then(|()| scene(&|| respawn_loop(&exe, &type_dir)));
    for dir in cgroupfs::children(&type_dir) {
        let _ = cgroupfs::kill_and_remove(&dir);
    }
    drop(host);
    let _ = std::fs::remove_dir(&type_dir);
    result?;
    if interrupted() {
        bail!("interrupted; everything the demo made is removed");
    }
    say(
        "\nEach was stopped in the kernel, at the fork, with no daemon round trip. See \
         `spawnguard status`, `spawnguard events`, `spawnguard top` and /metrics.",
    );
    Ok(())
}

/// The bombs, run as `spawnguard demo-worker KIND` inside their instance cgroup. Bounded:
/// a deadline and a cap of their own.
pub fn worker(kind: &str) -> Result<()> {
    let deadline = Instant::now() + BOMB_TIME;
    match kind {
        "fork" => {
            // SAFETY: a shared anonymous mapping for one counter, seen by every forked process.
            let attempts = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    8,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    bail!("mmap: {}", std::io::Error::last_os_error());
                }
                &*(p as *const AtomicU64)
            };
            // SAFETY: children are reaped by the kernel; no handler runs.
            unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
            while Instant::now() < deadline && attempts.fetch_add(1, Ordering::Relaxed) < FORK_CAP {
                // SAFETY: a single-threaded process; the child only goes on with this loop.
                if unsafe { libc::fork() } < 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if let Some(left) = deadline.checked_duration_since(Instant::now()) {
                std::thread::sleep(left);
            }
        }
        "threads" => {
            let mut handles = Vec::new();
            for _ in 0..THREAD_CAP {
                if Instant::now() >= deadline {
                    break;
                }
                let until = deadline;
                match std::thread::Builder::new().spawn(move || {
                    if let Some(left) = until.checked_duration_since(Instant::now()) {
                        std::thread::sleep(left);
                    }
                }) {
                    Ok(h) => handles.push(h),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
                // Slow enough to watch it climb to the budget.
                std::thread::sleep(Duration::from_millis(40));
            }
            for h in handles {
                let _ = h.join();
            }
        }
        // A worker that crashes at start-up.
        "crash" => std::process::exit(3),
        _ => bail!("unknown demo worker {kind:?}"),
    }
    Ok(())
}
