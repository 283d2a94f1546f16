//! Privileged end-to-end tests of the control plane: live `policy apply` and SIGHUP during a
//! bomb, bad files changing nothing, the root-only socket, and max age.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    thread::sleep,
    time::{Duration, Instant},
};

use spawnguard_tests::*;

#[test]
fn live_policy_apply_changes_the_limit_a_running_bomb_sees() {
    if !privileged() {
        return;
    }
    let (rel, tree) = test_type("apply");
    let _daemon = Daemon::start(&policy("ap", &rel, "max_tasks = 20"), "auto").unwrap();
    let inst = tree.root.join("i1");
    // Forking for 10 s: a `policy apply` in a slow (emulated) guest takes seconds, and the bomb
    // must still be forking after it. With the lsm backend a denied fork fails at once and the
    // bomb retries every 1 ms per process: the cap must outlast the deadline at 35 processes.
    let bomb = exec_bomb("ap", "i1", &["fork", "10000", "500000", "1500"])
        .spawn()
        .unwrap();
    let first = max_held(&inst, Duration::from_millis(800), 20, false);
    assert!((19..=20).contains(&first), "before: {first}");

    // Raised while the bomb runs: it grows to the new limit, no further.
    let raised = write_policy("apply-raise", &policy("ap", &rel, "max_tasks = 35"));
    let out = cli(&["policy", "apply", raised.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_tasks 20 -> 35"));
    let grown = max_held(&inst, Duration::from_millis(800), 35, false);
    assert!((34..=35).contains(&grown), "after raising to 35: {grown}");

    // Lowered below usage: new tasks are denied, existing ones are never killed.
    let lowered = write_policy("apply-lower", &policy("ap", &rel, "max_tasks = 10"));
    assert!(cli(&["policy", "apply", lowered.to_str().unwrap()])
        .status
        .success());
    sleep(Duration::from_millis(300));
    let kept = live_tasks(&inst);
    assert!(kept >= 34, "lowering the limit killed tasks: {kept} left");

    // An invalid file changes nothing.
    let bad = write_policy(
        "apply-bad",
        &format!("{}\nmax_tasks = -1\n", policy("ap", &rel, "")),
    );
    let out = cli(&["policy", "apply", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:", bad.display())), "{err}");
    let shown = cli(&["policy", "show"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("max_tasks = 10"));
    assert_eq!(type_status("ap")["max_tasks"], 10);
    bomb.wait_with_output().unwrap();
}

#[test]
fn sighup_reloads_the_policy_file_or_keeps_the_old_one() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("sighup");
    let daemon = Daemon::start(&policy("hu", &rel, "max_tasks = 7"), "auto").unwrap();
    fs::write(&daemon.policy_file, policy("hu", &rel, "max_tasks = 9")).unwrap();
    daemon.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || type_status("hu")
        ["max_tasks"]
        == 9));
    fs::write(&daemon.policy_file, "[[type]\nbroken").unwrap();
    daemon.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || {
        daemon
            .log_text()
            .contains("the previous policy is still in force")
    }));
    assert_eq!(type_status("hu")["max_tasks"], 9);
}

#[test]
fn the_control_socket_refuses_non_root_clients() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("nonroot");
    let _daemon = Daemon::start(&policy("nr", &rel, "max_tasks = 5"), "auto").unwrap();
    let socket = "/run/spawnguard/control.sock";
    let mode = fs::metadata(socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = as_nobody(&["policy", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root only"), "{err}");
    // Even when the file mode lets it connect, the daemon checks the peer's credentials.
    fs::set_permissions(socket, fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["policy", "show"]);
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only root may use the spawnguard control socket"),
        "{err}"
    );
}

#[test]
fn max_age_kills_or_reports_by_creation_time() {
    if !privileged() {
        return;
    }
    let (rel_kill, kill_tree) = test_type("maxage-kill");
    let (rel_event, event_tree) = test_type("maxage-event");
    let daemon = Daemon::start(
        &format!(
            "{}{}",
            policy(
                "mk",
                &rel_kill,
                "max_tasks = 5\nmax_age = \"3s\"\non_max_age = \"kill\""
            ),
            policy("me", &rel_event, "max_tasks = 5\nmax_age = \"3s\"")
        ),
        "auto",
    )
    .unwrap();
    let start = Instant::now();
    let mut killed = exec_bomb("mk", "old", &["hold", "20000"]).spawn().unwrap();
    let mut kept = exec_bomb("me", "old", &["hold", "8000"]).spawn().unwrap();
    let status = killed.wait().unwrap();
    let took = start.elapsed();
    assert!(!status.success(), "killed by cgroup.kill");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(6),
        "killed after {took:?}, max_age 3s"
    );
    assert!(wait_for(Duration::from_secs(3), || {
        subtree_threads(&kill_tree.root.join("old")).is_empty()
    }));
    assert!(
        kept.try_wait().unwrap().is_none(),
        "on_max_age = event keeps it running"
    );
    assert!(wait_for(Duration::from_secs(3), || {
        daemon
            .log_text()
            .contains(&format!("{}/old (type me)", event_tree.root.display()))
    }));
    let _ = kept.kill();
    let _ = kept.wait();
}
