//! Privileged end-to-end tests of per-type ceilings (`max_instances`), type and host budgets and
//! warning thresholds, with the real programs and real cgroups (kill backend, the default here).

use std::{fs, process::Command, thread::sleep, time::Duration};

use spawnguard_tests::*;

/// Runs `sh -c 'echo ran > MARKER'` as a new instance; returns whether it ran.
fn instance_runs(type_name: &str, instance: &str, marker: &std::path::Path) -> bool {
    let _ = fs::remove_file(marker);
    let status = Command::new(spawnguard_bin())
        .args(["exec", "--type", type_name, "--instance", instance, "--"])
        .args(["sh", "-c", &format!("echo ran > {}", marker.display())])
        .status()
        .unwrap();
    status.success() && marker.exists()
}

#[test]
fn a_type_at_its_ceiling_admits_no_new_instance() {
    if !privileged() {
        return;
    }
    let (rel, tree) = test_type("ceiling");
    let daemon = Daemon::start(
        &policy("ce", &rel, "max_tasks = 10\nmax_instances = 3"),
        "auto",
    )
    .unwrap();
    let mut live: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|i| exec_bomb("ce", i, &["hold", "20000"]).spawn().unwrap())
        .collect();
    assert!(wait_for(Duration::from_secs(5), || type_status("ce")
        ["instances"]
        == 3));

    let marker = std::env::temp_dir().join(format!("sg-ceiling-{}", std::process::id()));
    assert!(
        !instance_runs("ce", "d", &marker),
        "a 4th instance ran user code"
    );
    let t = type_status("ce");
    assert_eq!(t["instances"], 3, "{t}");
    assert!(t["denied"]["max_instances"].as_u64().unwrap() >= 1, "{t}");
    assert!(daemon.log_text().contains("type ce at ceiling 3/3"));
    // `gate` says so before a runtime spawns one (the kernel's own admission, on copies).
    let gate = cli(&["gate", "ce"]);
    let why = String::from_utf8_lossy(&gate.stdout);
    assert!(
        !gate.status.success() && why.contains("ceiling 3/3"),
        "{why}"
    );

    // Admitted instances keep growing: the ceiling is on instances, not tasks.
    let out = exec_bomb("ce", "a", &["rate", "500", "3"])
        .output()
        .unwrap();
    assert_eq!(
        report_value(&String::from_utf8_lossy(&out.stdout), "ran"),
        3
    );

    // One instance ends: its slot is free, the 4th is admitted.
    let mut first = live.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(wait_for(Duration::from_secs(5), || type_status("ce")
        ["instances"]
        == 2));
    assert!(cli(&["gate", "ce"]).status.success(), "a slot is free");
    assert!(
        instance_runs("ce", "d", &marker),
        "after one instance ended, d is admitted"
    );
    let _ = fs::remove_file(&marker);
    for mut p in live {
        let _ = p.kill();
        let _ = p.wait();
    }
    drop(tree);
}

#[test]
fn instances_racing_for_the_last_slot_one_wins() {
    if !privileged() {
        return;
    }
    let (rel, tree) = test_type("race");
    let _daemon = Daemon::start(
        &policy("ra", &rel, "max_tasks = 10\nmax_instances = 2"),
        "auto",
    )
    .unwrap();
    let mut holder = exec_bomb("ra", "holder", &["hold", "60000"])
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(5), || type_status("ra")
        ["instances"]
        == 1));
    for round in 0..25 {
        let dirs: Vec<_> = (0..4)
            .map(|i| {
                let d = tree.root.join(format!("r{round}-{i}"));
                fs::create_dir_all(&d).unwrap();
                d
            })
            .collect();
        // Four parents outside every instance each clone a child straight into its own new
        // instance, all at once; only one instance slot is left.
        let racers: Vec<_> = dirs
            .iter()
            .map(|d| spawn_outside(&["clone-into", d.to_str().unwrap(), "300"]))
            .collect();
        let admitted = racers
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .filter(|o| String::from_utf8_lossy(&o.stdout).contains("exited=true"))
            .count();
        assert_eq!(
            admitted, 1,
            "round {round}: {admitted} instances took the last slot"
        );
        assert!(wait_for(Duration::from_secs(5), || type_status("ra")
            ["instances"]
            == 1));
    }
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn type_and_host_budgets_deny_with_their_own_reason() {
    if !privileged() {
        return;
    }
    // Type budget: 6 tasks across all instances of the type.
    let (rel, tree) = test_type("typebudget");
    {
        let _daemon = Daemon::start(
            &policy("tt", &rel, "max_tasks = 10\nmax_total_tasks = 6"),
            "auto",
        )
        .unwrap();
        let mut a = exec_bomb("tt", "a", &["threads", "300", "3", "3000"])
            .spawn()
            .unwrap();
        assert!(wait_for(Duration::from_secs(5), || {
            instance_counts(&tree.root.join("a")).0 == 4
        }));
        let out = exec_bomb("tt", "b", &["fork", "800", "50", "300"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let t = type_status("tt");
        assert!(t["denied"]["max_total_tasks"].as_u64().unwrap() > 0, "{t}");
        assert_eq!(t["denied"]["max_tasks"], 0, "{t}");
        let _ = a.kill();
        let _ = a.wait();
    }
    drop(tree);

    // Host budget: 10 tasks, denied above deny_at = 0.5; warn_at = 0.3 fires once.
    let (rel, tree) = test_type("hostbudget");
    let daemon = Daemon::start(
        &format!(
            "[host]\nmax_tasks = 10\nwarn_at = 0.3\ndeny_at = 0.5\n\n{}",
            policy("hb", &rel, "max_tasks = 100")
        ),
        "auto",
    )
    .unwrap();
    let inst = tree.root.join("a");
    // It forks for 1.5 s and holds its processes 5 s more: the state is read while it holds.
    let bomb = exec_bomb("hb", "a", &["fork", "1500", "2000", "5000"])
        .spawn()
        .unwrap();
    let mut s = serde_json::Value::Null;
    let held = wait_for(Duration::from_secs(6), || {
        s = status();
        live_tasks(&inst) == 5 && s["host"]["tasks"] == 5
    });
    let gate = cli(&["gate", "hb"]);
    let why = String::from_utf8_lossy(&gate.stdout);
    assert!(
        !gate.status.success() && why.contains("host at 50 % of its budget (5/10"),
        "{why}"
    );
    // Past the forks' deadline: no more than 5 even after every retry.
    sleep(Duration::from_millis(1600));
    assert!(held, "not held at deny_at * max_tasks: {s}");
    assert_eq!(live_tasks(&inst), 5, "held at deny_at * max_tasks");
    let s = status();
    assert_eq!(s["host"]["tasks"], 5, "{s}");
    let t = type_status("hb");
    assert!(t["denied"]["host_max_tasks"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(
        t["warnings"], 1,
        "host 3/10 only (the instance never nears 30/100): {t}"
    );
    bomb.wait_with_output().unwrap();
    let log = daemon.log_text();
    // The usage an event reports is read when it is written: another CPU's fork may have
    // added to it by then (3/10 on an idle machine, up to the 5 held).
    assert!(
        (3..=5).any(|n| log.contains(&format!("warning: host_max_tasks reached {n}/10"))),
        "{log}"
    );
    assert!(log.contains("host_max_tasks 5/5"), "{log}");
}

#[test]
fn an_exempt_type_is_counted_and_reported_never_denied() {
    if !privileged() {
        return;
    }
    let (rel, tree) = test_type("exempt");
    let _daemon = Daemon::start(
        &policy(
            "ex",
            &rel,
            "max_tasks = 5\nmax_instances = 1\nexempt = true",
        ),
        "auto",
    )
    .unwrap();
    let out = exec_bomb("ex", "a", &["fork", "800", "15", "600"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(report_value(&report, "failed"), 0, "{report}");
    let second = exec_bomb("ex", "b", &["rate", "300", "2"])
        .output()
        .unwrap();
    assert!(
        second.status.success(),
        "a second instance of an exempt type runs"
    );
    let t = type_status("ex");
    assert_eq!(t["denied"]["max_tasks"], 0, "{t}");
    assert!(t["audit_denied"]["max_tasks"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["forks_allowed"], 17, "15 forks + 2 in b: {t}");
    drop(tree);
}

/// `spawnguard gate TYPE` as an unprivileged user (the agent runtime's own account): exit code
/// and its one line.
fn gate_as_nobody(type_name: &str) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65_534;
    let out = Command::new(spawnguard_bin())
        .args(["gate", type_name])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_runtime_that_is_not_root_asks_the_gate_through_the_daemon_s_socket() {
    if !privileged() {
        return;
    }
    let (rel, _tree) = test_type("gate-socket");
    let policy = policy("gs", &rel, "max_tasks = 10\nmax_instances = 1");
    // Root only by default: an unprivileged caller is told how to open it.
    {
        let _daemon = Daemon::start_with(&policy, &[]).unwrap();
        let (code, text) = gate_as_nobody("gs");
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("--gate-group"), "{text}");
    }
    let _daemon = Daemon::start_with(&policy, &["--gate-group", "65534"]).unwrap();
    // A root runtime keeps the maps open across checks (the library, no process).
    let kept = spawnguard::gate::PinnedGate::open().unwrap();
    assert_eq!(
        kept.check("gs").unwrap(),
        spawnguard::gate::Verdict::Admitted
    );
    let (code, text) = gate_as_nobody("gs");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("ok: "), "{text}");
    let (code, text) = gate_as_nobody("no-such-type");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no type \"no-such-type\""), "{text}");
    // The one slot taken: refused, with the same line root gets.
    let mut holder = exec_bomb("gs", "a", &["hold", "20000"]).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(5), || type_status("gs")
        ["instances"]
        == 1));
    let (code, text) = gate_as_nobody("gs");
    let root = cli(&["gate", "gs"]);
    let in_process = kept.check("gs");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text, String::from_utf8_lossy(&root.stdout), "as root");
    assert!(text.contains("ceiling 1/1"), "{text}");
    assert_eq!(
        in_process.unwrap(),
        spawnguard::gate::Verdict::Refused(text.trim_end().trim_start_matches("no: ").into()),
        "the kept handle sees the slot taken"
    );
}
