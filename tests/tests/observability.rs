//! Privileged end-to-end tests of what operators see: the Prometheus endpoint (checked by
//! promtool and scraped by a real Prometheus server), the event stream, `top` in a
//! pseudo-terminal, and `spawnguard demo`.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use spawnguard_tests::*;

/// Metrics port of the test daemons (not the default, so a real daemon on the host is safe).
const METRICS: &str = "127.0.0.1:19617";

fn start(policy_text: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--metrics-listen", METRICS];
    args.extend_from_slice(extra);
    Daemon::start_with(policy_text, &args).unwrap()
}

fn scrape() -> String {
    http_get(METRICS, "/metrics").unwrap()
}

/// A process we started, killed (by pid) and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fork_bomb(type_name: &str, instance: &str) -> String {
    let out = exec_bomb(type_name, instance, &["fork", "1000", "3000", "200"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks in a scrape that every fork a bomb made (its report: attempts, failed) was either
/// counted in or denied, nothing lost; returns the denials. A fork the lsm backend denied
/// failed with EAGAIN; with the kill backends it succeeded and its child was killed.
fn every_fork_counted(text: &str, type_name: &str, report: &str) -> f64 {
    let value = |name: &str, label: &str| {
        metric(text, name, &format!(r#"{label},type="{type_name}""#))
            .unwrap_or_else(|| panic!("no {name} for {type_name}: {text}"))
    };
    let denied = value("spawnguard_denials_total", r#"reason="max_tasks""#);
    let allowed = value("spawnguard_spawns_allowed_total", r#"kind="process""#);
    assert_eq!(
        (denied + allowed) as u64,
        report_value(report, "attempts") - report_value(report, "failed")
            + report_value(report, "eagain"),
        "a fork went uncounted: {report}\n{text}"
    );
    denied
}

#[test]
fn metrics_count_every_fork_and_denial_and_pass_promtool() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("metrics");
    let _daemon = start(&policy("mx", &rel, "max_tasks = 10"), &[]);
    let before = scrape();
    assert_eq!(
        metric(
            &before,
            "spawnguard_denials_total",
            r#"reason="max_tasks",type="mx""#
        ),
        Some(0.0),
        "{before}"
    );
    let report = fork_bomb("mx", "i1");
    let text = scrape();
    assert!(every_fork_counted(&text, "mx", &report) > 0.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "spawnguard_instance_budget_tasks",
            r#"budget="max_tasks",type="mx""#
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(&text, "spawnguard_instances_admitted_total", r#"type="mx""#),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "spawnguard_map_capacity", r#"map="instances""#),
        Some(16384.0)
    );
    assert!(
        text.contains("spawnguard_build_info{backend=\"kill\","),
        "{text}"
    );
    // Per-instance series are opt-in.
    assert!(!text.contains("spawnguard_instance_tasks"), "{text}");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `spawnguard_denials_total` as a real Prometheus server sees it (None: no such series yet).
fn prometheus_value(api: &str, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(api, &format!("/api/v1/query?query={encoded}")).ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_server_sees_the_denials_rise() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("prom");
    let _daemon = start(&policy("pm", &rel, "max_tasks = 10"), &[]);
    let dir = std::env::temp_dir().join(format!("sg-prometheus-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: spawnguard\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    let api = "127.0.0.1:19090";
    let server = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={api}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus; `cargo xtask setup` installs it)");
    let _server = Reaped(server);
    let query = r#"spawnguard_denials_total{type="pm",reason="max_tasks"}"#;
    let log = || fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(60), || prometheus_value(api, query)
            == Some(0.0)),
        "Prometheus never scraped spawnguard's zero: {}",
        log()
    );
    fork_bomb("pm", "i1");
    let mut seen = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            seen = prometheus_value(api, query);
            seen.is_some_and(|v| v > 0.0)
        }),
        "denials never rose in Prometheus (last {seen:?}): {}",
        log()
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_thousand_instances_make_a_bounded_number_of_series() {
    if !privileged() {
        return;
    }
    let (rel, tree) = test_type("cardinality");
    let _daemon = start(
        &policy("cd", &rel, "max_tasks = 10"),
        &["--metrics-instances", "top:20"],
    );
    let base = series_count(&scrape());
    for i in 0..1000 {
        fs::create_dir_all(tree.root.join(format!("i{i}"))).unwrap();
    }
    // 30 instances with live tasks: only the 20 with the most get series of their own.
    let holders: Vec<_> = (0..30)
        .map(|i| {
            Reaped(
                exec_bomb("cd", &format!("i{i}"), &["hold", "30000"])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    assert!(wait_for(Duration::from_secs(10), || type_status("cd")
        ["tasks"]
        == 30));
    let text = scrape();
    let instance_series = text
        .lines()
        .filter(|l| l.starts_with("spawnguard_instance_tasks{"))
        .count();
    assert_eq!(instance_series, 20, "{text}");
    // Only the instances with tasks hold an entry; every directory keeps its creation time.
    assert_eq!(
        metric(&text, "spawnguard_map_entries", r#"map="instances""#).unwrap(),
        30.0,
        "{text}"
    );
    assert!(
        metric(&text, "spawnguard_map_entries", r#"map="created""#).unwrap() >= 1000.0,
        "{text}"
    );
    // The type's own series did not grow; only the 3 capped instance families were added.
    assert_eq!(series_count(&text), base + 3 * 20, "{text}");
    drop(holders);
}

/// Reads JSON lines from a child's stdout on a thread, so the test can wait with a deadline.
fn json_lines(child: &mut Child) -> std::sync::mpsc::Receiver<Value> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    rx
}

fn find(rx: &std::sync::mpsc::Receiver<Value>, what: impl Fn(&Value) -> bool) -> Option<Value> {
    first_matching(rx, Duration::from_secs(15), what)
}

#[test]
fn a_denial_appears_in_the_event_stream_with_its_budget_and_usage() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("events");
    let _daemon = start(&policy("ev", &rel, "max_tasks = 10"), &[]);
    let mut follower = Command::new(spawnguard_bin())
        .args(["events", "--follow", "--output", "json", "--type", "ev"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = json_lines(&mut follower);
    let _follower = Reaped(follower);
    // Let the follower subscribe before the bomb.
    std::thread::sleep(Duration::from_millis(500));
    fork_bomb("ev", "b1");
    let admitted = find(&rx, |v| v["kind"] == "admitted").expect("an admitted event");
    assert!(
        admitted["instance"].as_str().unwrap().ends_with("/b1"),
        "{admitted}"
    );
    let d = find(&rx, |v| v["kind"] == "denied").expect("a denied event");
    assert_eq!(d["schema"], 1, "{d}");
    assert_eq!(d["type"], "ev", "{d}");
    assert!(
        d["instance"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{rel}/b1")),
        "{d}"
    );
    assert_eq!(d["reason"], "max_tasks", "{d}");
    assert_eq!(d["cause"], "fork", "{d}");
    assert_eq!(d["usage"], 10, "{d}");
    assert_eq!(d["limit"], 10, "{d}");
    assert_eq!(d["comm"], "sg-bomb", "{d}");
    // The bomb's first process was started by `spawnguard exec` (which waits outside the
    // instance); every other by a bomb.
    assert!(
        d["parent_comm"] == "sg-bomb" || d["parent_comm"] == "spawnguard",
        "the spawner's parent is the bomb or spawnguard exec: {d}"
    );
    assert_eq!(d["backend"], status()["backend"], "{d}");
    assert!(d["pid"].as_u64().unwrap() > 0, "{d}");
    // The lsm backend refuses the fork before the child exists: no target pid.
    assert_eq!(
        d["target_pid"].as_u64().is_some(),
        d["backend"] != "lsm",
        "{d}"
    );
    assert!(d["time"].as_str().unwrap().ends_with('Z'), "{d}");

    // Without --follow: the recent events, filtered by type.
    let out = cli(&["events", "--output", "json", "--type", "ev"]);
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|v| v["kind"] == "denied"));
    assert!(lines.iter().all(|v| v["type"] == "ev"));
    let other = cli(&["events", "--output", "json", "--type", "nosuchtype"]);
    assert!(other.status.success() && other.stdout.is_empty());
}

/// What the daemon does itself (a max-age kill, a breaker opened by hand) is in the stream too.
#[test]
fn daemon_actions_appear_in_the_event_stream() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("daemon-events");
    let _daemon = start(
        &policy(
            "de",
            &rel,
            "max_tasks = 5\nmax_age = \"1s\"\non_max_age = \"kill\"\n[type.breaker]\nstartup_window = \"1s\"",
        ),
        &[],
    );
    let mut old = Reaped(exec_bomb("de", "old", &["hold", "20000"]).spawn().unwrap());
    assert!(wait_for(Duration::from_secs(5), || old
        .0
        .try_wait()
        .unwrap()
        .is_some()));
    let out = cli(&[
        "breaker",
        "open",
        "de",
        "--for",
        "30s",
        "--reason",
        "upstream down",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = cli(&["events", "--output", "json", "--type", "de"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let aged = lines
        .iter()
        .find(|v| v["kind"] == "max_age" && v["cause"] == "timer")
        .unwrap_or_else(|| panic!("no max-age action: {lines:?}"));
    assert!(
        aged["instance"].as_str().unwrap().ends_with("/old"),
        "{aged}"
    );
    assert!(
        aged["message"].as_str().unwrap().ends_with("killed"),
        "{aged}"
    );
    assert_eq!(aged["limit"], 1, "{aged}");
    let opened = lines
        .iter()
        .find(|v| v["kind"] == "breaker" && v["cause"] == "manual")
        .unwrap_or_else(|| panic!("no manual breaker transition: {lines:?}"));
    assert_eq!(opened["breaker"]["from"], "closed", "{opened}");
    assert_eq!(opened["breaker"]["to"], "open", "{opened}");
    assert!(
        opened["message"]
            .as_str()
            .unwrap()
            .contains("upstream down"),
        "{opened}"
    );
}

#[test]
fn a_full_ring_buffer_shows_in_the_dropped_counter_never_as_a_missed_denial() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("overflow");
    let daemon = start(&policy("of", &rel, "max_tasks = 10"), &[]);
    // Nothing reads the ring while the daemon is stopped.
    // SAFETY: stopping and resuming our own child.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGSTOP) };
    // As long as enforcement.rs's ring test: the slowest guest needs it to refuse 3,000.
    let out = exec_bomb("of", "i1", &["fork", "8000", "20000", "200"])
        .output()
        .unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGCONT) };
    let report = String::from_utf8_lossy(&out.stdout);
    let text = scrape();
    let dropped = metric(&text, "spawnguard_events_dropped_total", "").unwrap();
    assert!(dropped > 0.0, "{text}");
    every_fork_counted(&text, "of", &report);
}

/// Runs `spawnguard top` on a pseudo-terminal; returns everything it drew until `q`.
fn top_on_a_pty(wait: Duration) -> (String, std::process::ExitStatus) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 50,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into our integers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned here only.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(spawnguard_bin());
    cmd.args(["top", "--interval", "200ms"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // SAFETY: only setsid + TIOCSCTTY in the child before exec: the pty becomes its terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        })
    };
    let child = cmd.spawn().unwrap();
    let mut reader = fs::File::from(master.try_clone().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut drawn = Vec::new();
    let end = Instant::now() + wait;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if let Ok(b) = rx.recv_timeout(left) {
            drawn.extend(b);
        }
    }
    let mut child = Reaped(child);
    fs::File::from(master).write_all(b"q").unwrap();
    let mut status = None;
    wait_for(Duration::from_secs(5), || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    let status = status.expect("top did not quit on q");
    (String::from_utf8_lossy(&drawn).into_owned(), status)
}

#[test]
fn top_in_a_terminal_shows_the_bombing_instance_and_quits_on_q() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("top");
    let _daemon = start(&policy("tp", &rel, "max_tasks = 10"), &[]);
    let bomb = exec_bomb("tp", "bomber", &["fork", "3000", "20000", "1000"])
        .spawn()
        .unwrap();
    let _bomb = Reaped(bomb);
    std::thread::sleep(Duration::from_millis(500));
    let (drawn, status) = top_on_a_pty(Duration::from_secs(2));
    assert!(status.success(), "top exited {status}: {drawn}");
    assert!(drawn.contains("spawnguard top"), "{drawn}");
    assert!(drawn.contains("tp "), "the type's row: {drawn}");
    assert!(
        drawn.contains(&format!("{rel}/bomber")),
        "the bombing instance: {drawn}"
    );
    assert!(
        drawn.contains("10/10"),
        "its tasks against its budget: {drawn}"
    );
}

fn demo() -> String {
    let out = Command::new(spawnguard_bin())
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for scene in ["1. fork bomb", "2. thread bomb", "3. crash-respawn loop"] {
        assert!(text.contains(scene), "{text}");
    }
    assert_eq!(text.matches("contained:").count(), 3, "{text}");
    assert!(
        !cgroup2_mount().join("spawnguard-demo").exists(),
        "demo left its cgroups"
    );
    text
}

#[test]
fn demo_runs_alone_and_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    uninstall();
    let text = demo();
    assert!(text.contains("started one for the demo"), "{text}");
    assert!(text.contains("never more than 32 tasks"), "{text}");
    assert!(text.contains("breaker went closed -> open"), "{text}");
    assert!(
        !Path::new(PIN_DIR).exists(),
        "the demo's daemon left its enforcer"
    );
}

#[test]
fn demo_with_a_running_daemon_puts_its_policy_back() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("demo-host");
    let text = policy("host", &rel, "max_tasks = 10");
    let _daemon = start(&text, &[]);
    let out = demo();
    assert!(out.contains("added the throw-away type"), "{out}");
    assert!(out.contains("put the policy back"), "{out}");
    let shown = cli(&["policy", "show"]);
    assert_eq!(String::from_utf8_lossy(&shown.stdout), text);
}
