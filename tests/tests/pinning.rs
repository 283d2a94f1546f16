//! Privileged end-to-end tests of the pinned enforcer: it outlives its daemon, a new daemon
//! adopts it with exact counts, a first daemon counts agents that already run, and only
//! `spawnguard uninstall` removes it.

use std::{
    fs,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use spawnguard_tests::*;

/// Removes the pinned enforcer when a test ends, even when it fails.
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Command::new(spawnguard_bin()).arg("uninstall").output();
    }
}

#[test]
fn enforcement_survives_kill_9_and_a_new_daemon_adopts_exact_counts() {
    if !privileged() {
        return;
    }
    uninstall();
    let _cleanup = Uninstall;
    let (rel, tree) = test_type("survive");
    let text = policy("sv", &rel, "max_tasks = 40");
    let mut daemon = Daemon::start_pinned(&text).unwrap();
    let inst = tree.root.join("i1");
    let bomb = exec_bomb("sv", "i1", &["fork", "4000", "30000", "4000"])
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(800));
    daemon.kill9();
    let most = max_held(&inst, Duration::from_millis(3000), 40, false);
    assert!(
        most <= 40,
        "without its daemon the enforcer let {most} tasks in, budget 40"
    );
    assert!(most >= 39, "the bomb did not fill its budget ({most})");

    // The bomb holds (no more forks): a new daemon adopts the same counts.
    sleep(Duration::from_millis(500));
    let again = Daemon::start_pinned(&text).unwrap();
    assert!(
        again.log_text().contains("adopted the enforcer"),
        "{}",
        again.log_text()
    );
    let real = subtree_threads(&inst).len() as u64;
    assert_eq!(instance_counts(&inst).0, real, "adopted counts are exact");
    let t = type_status("sv");
    assert!(t["denied"]["max_tasks"].as_u64().unwrap() > 0, "{t}");
    bomb.wait_with_output().unwrap();
    assert!(wait_for(Duration::from_secs(5), || instance_counts(&inst)
        == (0, 0, 0)));
}

#[test]
fn a_first_daemon_counts_the_agents_already_running() {
    if !privileged() {
        return;
    }
    uninstall();
    let _cleanup = Uninstall;
    let (rel, tree) = test_type("reconcile");
    let (a, nested) = (tree.root.join("a"), tree.root.join("b/inner"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&nested).unwrap();
    let start = |dir: &std::path::Path, args: &[&str]| {
        let child = Command::new(bomb_bin())
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        sleep(Duration::from_millis(200));
        fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        child
    };
    // They hold for 60 s: a first install verifies for up to 40 s in the TCG guests.
    let mut running = vec![
        start(&a, &["threads", "100", "5", "60000"]),
        start(&a, &["hold", "60000"]),
        start(&nested, &["threads", "100", "2", "60000"]),
    ];
    // Already over budget: counted, not killed.
    let _daemon = Daemon::start_pinned(&policy("rc", &rel, "max_tasks = 5")).unwrap();
    assert_eq!(instance_counts(&a), (7, 2, 5));
    assert_eq!(instance_counts(&tree.root.join("b")), (3, 1, 2));
    for c in &mut running {
        assert!(
            c.try_wait().unwrap().is_none(),
            "a running agent was stopped"
        );
    }
    // And enforced from now on: a is over its budget, so nothing more starts there.
    let out = exec_bomb("rc", "a", &["rate", "300", "3"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a process moving into a full instance is stopped"
    );
    for mut c in running {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn only_uninstall_removes_the_enforcer() {
    if !privileged() {
        return;
    }
    uninstall();
    let _cleanup = Uninstall;
    let (rel, tree) = test_type("uninstall");
    let mut daemon = Daemon::start_pinned(&policy("un", &rel, "max_tasks = 5")).unwrap();
    assert!(daemon.stop().unwrap().success());
    let inst = tree.root.join("i1");
    // Stopped daemon, enforcer still there.
    let bomb = exec_bomb("un", "i1", &["fork", "800", "30", "800"])
        .spawn()
        .unwrap();
    let most = max_held(&inst, Duration::from_millis(1200), 5, false);
    bomb.wait_with_output().unwrap();
    assert!(most <= 5, "{most} tasks with the daemon stopped, budget 5");
    let s = status();
    assert_eq!(s["daemon_pid"], serde_json::Value::Null, "{s}");

    uninstall();
    assert!(!std::path::Path::new("/sys/fs/bpf/spawnguard").exists());
    // The type is unknown without a daemon: exec takes it from the policy file.
    let file = write_policy("uninstall", &policy("un", &rel, "max_tasks = 5"));
    let out = Command::new(spawnguard_bin())
        .args(["exec", "--type", "un", "--instance", "i2", "--policy"])
        .arg(&file)
        .arg("--")
        .arg(bomb_bin())
        .args(["fork", "500", "30", "300"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(report_value(&report, "attempts"), 30, "{report}");
    assert_eq!(
        report_value(&report, "failed"),
        0,
        "nothing enforces any more: {report}"
    );
    drop(tree);
}

#[test]
fn a_daemon_refuses_pinned_state_of_another_layout() {
    if !privileged() {
        return;
    }
    uninstall();
    let _cleanup = Uninstall;
    let old = std::path::Path::new("/sys/fs/bpf/spawnguard/v0");
    fs::create_dir_all(old).unwrap();
    let (rel, _tree) = test_type("layout");
    let out = Command::new(spawnguard_bin())
        .args(["run", "--policy"])
        .arg(write_policy("layout", &policy("ly", &rel, "max_tasks = 5")))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another map layout"), "{err}");
    assert!(err.contains("spawnguard uninstall"), "{err}");
}

#[test]
fn the_kernel_stops_an_instance_past_its_max_age_from_growing_without_a_daemon() {
    if !privileged() {
        return;
    }
    uninstall();
    let _cleanup = Uninstall;
    let (rel, _tree) = test_type("lazyage");
    let mut daemon = Daemon::start_pinned(&policy(
        "la",
        &rel,
        "max_tasks = 10\nmax_age = \"2s\"\non_max_age = \"kill\"",
    ))
    .unwrap();
    let mut old = exec_bomb("la", "old", &["hold", "8000"]).spawn().unwrap();
    sleep(Duration::from_millis(300));
    daemon.kill9();
    sleep(Duration::from_millis(2200));
    // No daemon to kill it; the kernel refuses anything new in it.
    let out = exec_bomb("la", "old", &["rate", "300", "3"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a process moved into an instance past its max age"
    );
    let t = type_status("la");
    assert!(t["denied"]["max_age"].as_u64().unwrap() >= 1, "{t}");
    assert!(
        old.try_wait().unwrap().is_none(),
        "what runs is left to the daemon"
    );
    let _ = old.kill();
    let _ = old.wait();
}
