//! Drill 6 of issue 19, socket abuse, against a real daemon: a silent client, oversized, deeply
//! nested and non-UTF-8 requests, 1,000 clients at once, non-root peers, an unsafe run
//! directory, and policy files a non-root user could change (at start and on reload). Each
//! check prints its figure (`FIGURE ...`) for RELIABILITY.md.
//!
//! The socket's limits do not depend on the programs loaded: this runs in the first host pass
//! only (the second, `SPAWNGUARD_EMULATED_ATOMICS=1`, skips it) and not in the guests.

use std::{
    fs,
    io::{Read, Write},
    os::unix::{
        fs::{symlink, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use spawnguard_tests::*;

const SOCKET: &str = "/run/spawnguard/control.sock";
const RUN_DIR: &str = "/run/spawnguard";

/// Whether this pass runs the drill (privileged, and the first host pass).
fn runs_here() -> bool {
    if std::env::var("SPAWNGUARD_EMULATED_ATOMICS").as_deref() == Ok("1") {
        eprintln!("skipped: the socket drill runs in the first host pass only");
        return false;
    }
    privileged()
}

/// Sends `bytes` and reads the daemon's reply (empty when it hung up first), with the time it
/// took. A write the daemon cut short (it refused before reading it all) is not an error.
fn exchange(bytes: &[u8]) -> (String, Duration) {
    let start = Instant::now();
    let mut s = UnixStream::connect(SOCKET).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
            let _ = w.shutdown(std::net::Shutdown::Write);
        })
    };
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let took = start.elapsed();
    // The daemon closed its end: a writer still blocked gets EPIPE and ends.
    drop(s);
    writer.join().unwrap();
    (String::from_utf8_lossy(&reply).into_owned(), took)
}

/// `status` over the socket answers, within `within`.
fn assert_serving(within: Duration, after: &str) {
    let (reply, took) = exchange(b"{\"request\":\"status\"}\n");
    assert!(
        reply.contains("\"ok\":true"),
        "status after {after}: {reply:?}"
    );
    assert!(took < within, "status after {after} took {took:?}");
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn a_silent_client_is_timed_out_and_delays_no_one() {
    if !runs_here() {
        return;
    }
    let (rel, _tree) = test_type("sock-silent");
    let _daemon = Daemon::start(&policy("sil", &rel, "max_tasks = 5"), "auto").unwrap();
    let start = Instant::now();
    let mut silent = UnixStream::connect(SOCKET).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Meanwhile, another client is answered at once.
    let (reply, took) = exchange(b"{\"request\":\"status\"}\n");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(took < Duration::from_secs(2), "a status took {took:?}");
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    let cut = start.elapsed();
    assert!(answer.contains("no complete request within 5s"), "{answer}");
    assert!(
        cut >= Duration::from_millis(4900) && cut < Duration::from_secs(15),
        "the silent client was cut after {cut:?}"
    );
    println!(
        "FIGURE silent-client: cut after {:.2} s; a status meanwhile answered in {:.1} ms",
        cut.as_secs_f64(),
        took.as_secs_f64() * 1e3
    );
    assert_serving(Duration::from_secs(2), "the silent client");
}

#[test]
fn bad_requests_and_a_crowd_are_refused_or_answered_in_bounded_memory() {
    if !runs_here() {
        return;
    }
    let (rel, _tree) = test_type("sock-abuse");
    let daemon = Daemon::start(&policy("abuse", &rel, "max_tasks = 5"), "auto").unwrap();
    let pid = daemon.pid();
    // Warm the status path first: the baseline is a daemon that has answered.
    assert_serving(Duration::from_secs(5), "start");
    // Reset the daemon's peak (VmHWM) to its resident size now: start-up's peak (the kernel's
    // BTF, parsed and freed) would hide the drill's.
    fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let (rss0, hwm0) = memory(pid);

    // 100 MB without a newline: refused past 1 MiB, the rest never read.
    let mut big = vec![b'x'; 100 << 20];
    big[..12].copy_from_slice(b"{\"request\":\"");
    let (reply, took) = exchange(&big);
    drop(big);
    assert!(
        reply.is_empty() || reply.contains("larger than 1048576 bytes"),
        "{reply}"
    );
    assert!(took < Duration::from_secs(10), "100 MB took {took:?}");
    let (_, hwm) = memory(pid);
    println!(
        "FIGURE 100MB: refused in {:.1} ms, reply {:?}, VmHWM {} -> {} KiB",
        took.as_secs_f64() * 1e3,
        reply.trim(),
        hwm0,
        hwm
    );
    assert_serving(Duration::from_secs(2), "100 MB");

    // 100,000 open brackets, alone and as a field's value (a request's fields are buffered
    // before its tag is read: there serde_json's recursion limit is what refuses it).
    let brackets = "[".repeat(100_000);
    for (deep, why) in [
        (format!("{brackets}\n"), "expected variant identifier"),
        (
            format!("{{\"request\":\"status\",\"pad\":{brackets}\n"),
            "recursion limit exceeded",
        ),
    ] {
        let (reply, took) = exchange(deep.as_bytes());
        assert!(reply.contains(why), "{reply}");
        println!(
            "FIGURE deep-nesting: 100,000 '[' refused in {:.1} ms: {}",
            took.as_secs_f64() * 1e3,
            reply.trim()
        );
        assert_serving(Duration::from_secs(2), "deep nesting");
    }

    // Invalid UTF-8.
    let (reply, took) = exchange(b"{\"request\":\"st\xff\xfeatus\"}\n");
    assert!(reply.contains("not UTF-8"), "{reply}");
    println!(
        "FIGURE invalid-utf8: refused in {:.1} ms: {}",
        took.as_secs_f64() * 1e3,
        reply.trim()
    );
    assert_serving(Duration::from_secs(2), "invalid UTF-8");

    // 1,000 clients connected at once, each asking for the status.
    let start = Instant::now();
    let mut clients: Vec<UnixStream> = (0..1000)
        .map(|_| {
            let mut s = UnixStream::connect(SOCKET).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(b"{\"request\":\"status\"}\n").unwrap();
            s
        })
        .collect();
    let mut answered = 0;
    for s in &mut clients {
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.contains("\"ok\":true"), "{reply}");
        answered += 1;
    }
    let took = start.elapsed();
    assert_eq!(answered, 1000);
    assert!(
        took < Duration::from_secs(60),
        "1,000 clients took {took:?}"
    );
    drop(clients);
    assert_serving(Duration::from_secs(2), "1,000 clients");

    let (rss1, hwm1) = memory(pid);
    println!(
        "FIGURE 1000-clients: all answered in {:.2} s; daemon VmRSS {rss0} -> {rss1} KiB, \
         VmHWM {hwm0} -> {hwm1} KiB over the whole drill",
        took.as_secs_f64()
    );
    // The socket's request buffers are bounded at 32 MiB (256 readers x 64 KiB + 16 large
    // readers x 1 MiB); this drill's peak is about 2 MiB over the baseline (measured).
    assert!(
        hwm1 < rss0 + (16 << 10),
        "the daemon's peak grew from {rss0} to {hwm1} KiB"
    );
    assert!(
        rss1 < rss0 + (16 << 10),
        "the daemon's RSS grew from {rss0} to {rss1} KiB"
    );
}

#[test]
fn a_non_root_peer_is_refused_even_with_the_socket_open_to_it() {
    if !runs_here() {
        return;
    }
    let (rel, _tree) = test_type("sock-nobody");
    let _daemon = Daemon::start(&policy("nob", &rel, "max_tasks = 5"), "auto").unwrap();
    // A thread that is nobody (raw setresuid changes the calling thread only, unlike libc's).
    let as_nobody_thread = || {
        std::thread::spawn(|| {
            // SAFETY: raw credential syscalls on this thread only; it ends right after.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                    0
                );
                assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
            }
            match UnixStream::connect(SOCKET) {
                Err(e) => format!("connect: {e}"),
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let _ = s.write_all(b"{\"request\":\"policy_show\"}\n");
                    let mut reply = String::new();
                    let _ = s.read_to_string(&mut reply);
                    reply
                }
            }
        })
        .join()
        .unwrap()
    };
    // The socket's mode keeps nobody out...
    let refused = as_nobody_thread();
    assert!(refused.contains("Permission denied"), "{refused}");
    // ...and where the mode would not, the peer's credentials do.
    fs::set_permissions(SOCKET, fs::Permissions::from_mode(0o666)).unwrap();
    let refused_by_daemon = as_nobody_thread();
    fs::set_permissions(SOCKET, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        refused_by_daemon
            .contains("only root may use the spawnguard control socket (peer uid 65534)"),
        "{refused_by_daemon}"
    );
    println!("FIGURE non-root: connect refused ({refused}); with mode 0666: {refused_by_daemon}");
    assert_serving(Duration::from_secs(2), "the non-root peers");
}

/// `spawnguard run` with this policy file, expected to refuse at once: its stderr.
fn refused_start(policy_file: &Path) -> String {
    let start = Instant::now();
    let out = Command::new(spawnguard_bin())
        .args(["run", "--backend", "auto", "--no-pin", "--policy"])
        .arg(policy_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the daemon started with {}",
        policy_file.display()
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A directory of the test's own under the temp directory, removed even when the test fails.
struct OwnDir(PathBuf);

impl OwnDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sg-sock-{name}-{}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        Self(p)
    }
}

impl Drop for OwnDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Puts the run directory back as it was, whatever the test did to it.
struct RunDirGuard {
    saved: PathBuf,
}

impl RunDirGuard {
    fn take() -> Self {
        let saved = PathBuf::from(format!("/run/spawnguard.sg-test-{}", std::process::id()));
        if Path::new(RUN_DIR).exists() {
            fs::rename(RUN_DIR, &saved).unwrap();
        }
        Self { saved }
    }

    fn clear(&self) {
        let p = Path::new(RUN_DIR);
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
            Ok(_) => fs::remove_file(p).unwrap(),
            Err(_) => {}
        }
    }
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        self.clear();
        if self.saved.exists() {
            let _ = fs::rename(&self.saved, RUN_DIR);
        }
    }
}

#[test]
fn a_run_directory_that_could_be_swapped_is_refused() {
    if !runs_here() {
        return;
    }
    uninstall();
    let (rel, _tree) = test_type("sock-rundir");
    let own = OwnDir::new("rundir");
    let dir = &own.0;
    let policy_file = dir.join("policy.toml");
    fs::write(&policy_file, policy("rundir", &rel, "max_tasks = 5")).unwrap();
    let elsewhere = dir.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let guard = RunDirGuard::take();

    symlink(&elsewhere, RUN_DIR).unwrap();
    let err = refused_start(&policy_file);
    assert!(err.contains("/run/spawnguard: is a symlink"), "{err}");
    println!("FIGURE run-dir symlink: {}", err.trim());
    guard.clear();

    fs::create_dir(RUN_DIR).unwrap();
    fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(RUN_DIR, Some(65534), Some(65534)).unwrap();
    let err = refused_start(&policy_file);
    assert!(
        err.contains("/run/spawnguard: owned by uid 65534, not root"),
        "{err}"
    );
    println!("FIGURE run-dir owner: {}", err.trim());

    std::os::unix::fs::chown(RUN_DIR, Some(0), Some(0)).unwrap();
    fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused_start(&policy_file);
    assert!(
        err.contains("/run/spawnguard: writable by group or others (mode 0777)"),
        "{err}"
    );
    println!("FIGURE run-dir mode: {}", err.trim());
    drop(guard);
    // The run directory is back, and a daemon starts with it.
    let meta = fs::symlink_metadata(RUN_DIR).unwrap();
    assert!(meta.is_dir());
    drop(Daemon::start(&policy("rundir", &rel, "max_tasks = 5"), "auto").unwrap());
}

#[test]
fn a_policy_file_a_non_root_user_could_change_is_refused_at_start() {
    if !runs_here() {
        return;
    }
    let (rel, _tree) = test_type("sock-perm");
    let text = policy("perm", &rel, "max_tasks = 5");
    let own = OwnDir::new("perm");
    let dir = &own.0;
    let file = dir.join("policy.toml");
    fs::write(&file, &text).unwrap();

    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
    let err = refused_start(&file);
    assert!(
        err.contains(&format!(
            "{}: writable by group or others (mode 0666)",
            file.display()
        )),
        "{err}"
    );
    println!("FIGURE policy 0666: {}", err.trim());

    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
    let err = refused_start(&file);
    assert!(
        err.contains(&format!("{}: owned by uid 65534, not root", file.display())),
        "{err}"
    );
    std::os::unix::fs::chown(&file, Some(0), None).unwrap();

    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused_start(&file);
    assert!(
        err.contains(&format!(
            "{}: writable by group or others (mode 0777)",
            dir.display()
        )),
        "{err}"
    );
    println!("FIGURE policy dir 0777: {}", err.trim());
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();

    // A root-owned 0644 file right in the sticky, world-writable /tmp is fine.
    let in_tmp = PathBuf::from(format!("/tmp/sg-sock-policy-{}.toml", std::process::id()));
    fs::write(&in_tmp, &text).unwrap();
    fs::set_permissions(&in_tmp, fs::Permissions::from_mode(0o644)).unwrap();
    uninstall();
    let mut daemon = Command::new(spawnguard_bin())
        .args(["run", "--backend", "auto", "--no-pin", "--policy"])
        .arg(&in_tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = daemon.id() as u64;
    let ready = wait_for(Duration::from_secs(180), || {
        fs::read_to_string("/run/spawnguard/state.json")
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| v["pid"].as_u64() == Some(pid))
            || daemon.try_wait().unwrap().is_some()
    });
    let running = daemon.try_wait().unwrap().is_none();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    fs::remove_file(&in_tmp).unwrap();
    assert!(
        ready && running,
        "the daemon did not start with {}",
        in_tmp.display()
    );
}

#[test]
fn a_reload_of_a_policy_file_a_non_root_user_could_change_keeps_the_old_policy() {
    if !runs_here() {
        return;
    }
    let (rel, _tree) = test_type("sock-reload");
    let daemon = Daemon::start(&policy("rel", &rel, "max_tasks = 5"), "auto").unwrap();
    let file = daemon.policy_file.clone();
    let dir = file.parent().unwrap().to_path_buf();
    let refusals = |what: &Path| {
        daemon
            .log_text()
            .matches(&format!("refusing the policy file: {}", what.display()))
            .count()
    };
    let max_tasks = || type_status("rel")["max_tasks"].as_u64();

    // The watch: a world-writable file with a new limit is refused, the old one stays.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
    fs::write(&file, policy("rel", &rel, "max_tasks = 9")).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || refusals(&file) >= 1),
        "{}",
        daemon.log_text()
    );
    assert_eq!(max_tasks(), Some(5));
    // SIGHUP: refused too.
    let before = refusals(&file);
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(30), || refusals(&file) > before),
        "{}",
        daemon.log_text()
    );
    assert_eq!(max_tasks(), Some(5));
    // Made safe again (a change of mode only), the file is applied.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || max_tasks() == Some(9)),
        "{}",
        daemon.log_text()
    );

    // A directory on the path that others can write: refused, naming the directory.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(&file, policy("rel", &rel, "max_tasks = 7")).unwrap();
    let ok = wait_for(Duration::from_secs(30), || refusals(&dir) >= 1);
    let kept = max_tasks();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(ok, "{}", daemon.log_text());
    assert_eq!(kept, Some(9));
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(30), || max_tasks() == Some(7)),
        "{}",
        daemon.log_text()
    );
    let line = daemon
        .log_text()
        .lines()
        .find(|l| l.contains("refusing the policy file"))
        .unwrap_or_default()
        .to_owned();
    println!("FIGURE reload refused: {line}");
}
