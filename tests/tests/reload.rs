//! Privileged end-to-end tests of fleet operation on one host: the daemon applies its policy
//! file when it changes (an edit, a Kubernetes ConfigMap's `..data` symlink swap), never a
//! half-written one, keeps the policy in force when the file is invalid, and says so in its
//! log, its event stream and `/metrics`; `/healthz` and `/readyz` on the metrics listener.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use spawnguard_tests::*;

/// Metrics port of the test daemons (not the default, so a real daemon on the host is safe).
const METRICS: &str = "127.0.0.1:19618";

/// How long a reload may take to be seen: the watch's 0.5 s of quiet, then the apply (slow
/// in an emulated guest).
const RELOADED: Duration = Duration::from_secs(15);

fn scrape() -> String {
    http_get(METRICS, "/metrics").unwrap()
}

/// The status code and body of `GET PATH`.
fn probe(path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(METRICS).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {METRICS}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_owned())
}

fn value(text: &str, name: &str, labels: &str) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{text}"))
}

fn reloads(result: &str) -> f64 {
    value(
        &scrape(),
        "spawnguard_policy_reloads_total",
        &format!(r#"result="{result}""#),
    )
}

/// The hash label of `spawnguard_policy_info`.
fn policy_hash() -> String {
    let text = scrape();
    text.lines()
        .find_map(|l| l.strip_prefix(r#"spawnguard_policy_info{hash=""#))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no spawnguard_policy_info in\n{text}"))
        .to_owned()
}

/// The per-instance `max_tasks` of type `name` in force in the kernel.
fn max_tasks(name: &str) -> u64 {
    type_status(name)["max_tasks"].as_u64().unwrap()
}

fn wait_max_tasks(name: &str, want: u64, daemon: &Daemon) {
    assert!(
        wait_for(RELOADED, || max_tasks(name) == want),
        "max_tasks of {name} is {}, not {want}: {}",
        max_tasks(name),
        daemon.log_text()
    );
}

/// Writes `text` to `path` in place (as an editor that does not rename does).
fn write_in_place(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// The daemon's policy event records.
fn reload_events() -> Vec<Value> {
    let out = cli(&["events", "--output", "json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "policy_reload")
        .collect()
}

#[test]
fn an_edited_policy_file_is_applied_never_half_written_and_an_invalid_one_keeps_the_old() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("reload-edit");
    let daemon = Daemon::start_with(
        &policy("re", &rel, "max_tasks = 10"),
        &["--metrics-listen", METRICS],
    )
    .unwrap();
    let file = daemon.policy_file.clone();
    let first = scrape();
    assert_eq!(
        value(
            &first,
            "spawnguard_policy_reloads_total",
            r#"result="success""#
        ),
        0.0
    );
    assert_eq!(
        value(&first, "spawnguard_policy_last_reload_successful", ""),
        1.0
    );
    assert!(
        value(
            &first,
            "spawnguard_policy_last_reload_success_timestamp_seconds",
            ""
        ) > 1e9
    );
    let hash = policy_hash();

    // An edit: in force after the quiet time, counted, with a new hash.
    write_in_place(&file, &policy("re", &rel, "max_tasks = 20"));
    wait_max_tasks("re", 20, &daemon);
    assert!(wait_for(RELOADED, || reloads("success") == 1.0));
    let edited = policy_hash();
    assert_ne!(edited, hash);

    // Half a file, the rest well within the quiet time: only the whole file is read.
    let whole = policy("re", &rel, "max_tasks = 30");
    let (head, tail) = whole.split_at(whole.len() - 4);
    write_in_place(&file, head);
    std::thread::sleep(Duration::from_millis(100));
    fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(tail.as_bytes())
        .unwrap();
    wait_max_tasks("re", 30, &daemon);
    assert!(wait_for(RELOADED, || reloads("success") == 2.0));
    assert_eq!(reloads("failure"), 0.0, "a half-written file was read");
    let in_force = policy_hash();
    assert_ne!(in_force, edited);

    // An invalid file: the policy stays, and the log, the events and /metrics say why.
    write_in_place(&file, &policy("re", &rel, "max_tasks = \"many\""));
    assert!(
        wait_for(RELOADED, || reloads("failure") == 1.0),
        "{}",
        daemon.log_text()
    );
    let failed = scrape();
    assert_eq!(
        value(&failed, "spawnguard_policy_last_reload_successful", ""),
        0.0
    );
    assert_eq!(max_tasks("re"), 30);
    assert_eq!(policy_hash(), in_force);
    let located = format!("{}:4:", file.display());
    assert!(
        daemon.log_text().contains(&located),
        "no located error {located} in the log: {}",
        daemon.log_text()
    );
    let events = reload_events();
    assert!(
        events.iter().any(|e| e["reason"] == "failure"
            && e["cause"] == "watch"
            && e["message"].as_str().unwrap().contains(&located)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["reason"] == "success"),
        "{events:?}"
    );

    // The policy as a ConfigMap mounts it: policy.toml -> ..data/policy.toml, ..data ->
    // ..<timestamp>; the kubelet swaps ..data with a rename.
    let dir = file.parent().unwrap();
    let stamp = |n: &str, text: &str| -> PathBuf {
        let d = dir.join(format!("..2026_12_04_{n}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("policy.toml"), text).unwrap();
        d
    };
    stamp("a", &policy("re", &rel, "max_tasks = 30"));
    symlink("..2026_12_04_a", dir.join("..data")).unwrap();
    symlink("..data/policy.toml", dir.join("policy.toml.new")).unwrap();
    fs::rename(dir.join("policy.toml.new"), &file).unwrap();
    assert!(wait_for(RELOADED, || reloads("success") == 3.0));
    stamp("b", &policy("re", &rel, "max_tasks = 40"));
    symlink("..2026_12_04_b", dir.join("..data_tmp")).unwrap();
    fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_max_tasks("re", 40, &daemon);
    assert!(wait_for(RELOADED, || reloads("success") == 4.0));
    assert_eq!(
        value(&scrape(), "spawnguard_policy_last_reload_successful", ""),
        1.0
    );
}

#[test]
fn without_the_watch_only_sighup_reloads_and_readyz_fails_when_the_pins_go() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("reload-off");
    let mut daemon = Daemon::start_with(
        &policy("ro", &rel, "max_tasks = 10"),
        &["--metrics-listen", METRICS, "--no-watch-policy"],
    )
    .unwrap();
    assert_eq!(probe("/healthz"), (200, "ok\n".into()));
    assert_eq!(probe("/readyz"), (200, "ok\n".into()));
    assert_eq!(value(&scrape(), "spawnguard_enforcer_ready", ""), 1.0);
    let warn = value(
        &scrape(),
        "spawnguard_warn_threshold",
        r#"budget="max_tasks",type="ro""#,
    );
    assert_eq!(warn, 7.0, "warn_at 0.7 of 10");

    write_in_place(&daemon.policy_file, &policy("ro", &rel, "max_tasks = 20"));
    // Nothing to wait for: three times the watch's quiet time shows that nothing happens.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(max_tasks("ro"), 10);
    assert_eq!(reloads("success"), 0.0);
    daemon.signal(libc::SIGHUP);
    wait_max_tasks("ro", 20, &daemon);
    assert!(wait_for(RELOADED, || reloads("success") == 1.0));

    // The pinned links removed under the daemon: not ready any more (liveness is another
    // matter: its loops still turn).
    let links: Vec<PathBuf> = fs::read_dir("/sys/fs/bpf/spawnguard")
        .unwrap()
        .flatten()
        .map(|layout| layout.path().join("links"))
        .filter(|l| l.is_dir())
        .collect();
    assert!(!links.is_empty());
    for l in &links {
        for link in fs::read_dir(l).unwrap().flatten() {
            fs::remove_file(link.path()).unwrap();
        }
    }
    assert!(
        wait_for(Duration::from_secs(5), || probe("/readyz").0 == 503),
        "{:?}",
        probe("/readyz")
    );
    assert!(probe("/readyz").1.contains("is gone"));
    assert_eq!(value(&scrape(), "spawnguard_enforcer_ready", ""), 0.0);
    assert_eq!(probe("/healthz").0, 200);
    daemon.stop().unwrap();
    uninstall();
}
