//! `spawnguard doctor` on this host: what it reports matches what the kernel says and what
//! `run --backend auto` then does.

use std::fs;

use serde_json::Value;
use spawnguard_tests::*;

fn doctor_json() -> Value {
    let out = cli(&["doctor", "--output", "json"]);
    assert!(
        out.status.success(),
        "doctor failed on a host that runs spawnguard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

#[test]
fn doctor_reports_this_kernel_and_the_backend_that_run_then_uses() {
    if !privileged() {
        return;
    }
    uninstall();
    let r = doctor_json();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(r["kernel"], release.trim(), "{r}");
    assert_eq!(r["can_run"], true, "{r}");
    for name in ["root", "kernel", "btf", "cgroup2"] {
        assert_eq!(check(&r, name)["level"], "ok", "{r}");
    }
    // The LSM list as the kernel gives it, and advice exactly when bpf is missing from it.
    let lsms = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let has_bpf = lsms.trim().split(',').any(|m| m == "bpf");
    let lsm = check(&r, "lsm list");
    assert_eq!(lsm["level"], if has_bpf { "ok" } else { "warn" }, "{r}");
    if !has_bpf {
        assert!(lsm["advice"].as_str().unwrap().contains("lsm="), "{r}");
        // Without bpf in the list no BPF LSM program can attach.
        assert_eq!(check(&r, "bpf lsm programs")["level"], "warn", "{r}");
    }
    let probe = check(&r, "bpf lsm programs");
    assert!(
        probe["level"] == "ok" || probe["advice"].is_string(),
        "a missing piece without advice: {r}"
    );

    // `run --backend auto` picks what doctor said, for the reason doctor gave.
    let (rel, _tree) = test_type("doctor");
    let _daemon = Daemon::start(&policy("dr", &rel, "max_tasks = 10"), "auto").unwrap();
    let s = status();
    assert_eq!(s["backend"], r["backend"], "status {s}\ndoctor {r}");
    let table = cli(&["doctor"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&format!(
            "backend `auto` would choose: {}",
            r["backend"].as_str().unwrap()
        )),
        "{text}"
    );
    assert!(text.contains("daemon pid"), "the running daemon: {text}");
}

#[test]
fn doctor_without_root_says_what_to_fix_and_fails() {
    if !privileged() {
        return;
    }
    let out = as_nobody(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FATAL"), "{text}");
    assert!(
        text.contains("run spawnguard (and this check) as root"),
        "{text}"
    );
}
