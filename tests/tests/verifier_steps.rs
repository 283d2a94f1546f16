//! The regression guard on the programs' verifier steps (#18 item 5): unlike a timing, the steps
//! the kernel's verifier takes for a program are exact for one kernel, backend and build, so a
//! growth of a fifth is a change in the programs, never noise.
//!
//! The record is `tests/verifier-steps.toml`, keyed by kernel release, then backend (with
//! `+emulated-atomics` for the object kernels before 5.12 load), then program.
//! `cargo xtask verifier-steps --record` re-records this kernel's section.
//!
//! A kernel release with no section in the record is not a failure (a CI machine on another
//! kernel must pass; the test prints the figures and how to record them). A section that lacks
//! a backend or a program this kernel loads is one: the record is out of date. Half the
//! verifier's limit is checked on every kernel, recorded or not; the vm-test guests check it in
//! their smoke checks (`xtask/vm/init.sh`), as this file is host-only.

use std::{collections::BTreeMap, process::Command};

use serde_json::Value;
use spawnguard_tests::{backend_runs_here, privileged, spawnguard_bin, BACKENDS};

/// Kernel release → backend key → program → steps.
type Record = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;

const RECORD: &str = include_str!("../verifier-steps.toml");
/// How much a program's steps may grow over the record, in percent.
const ALLOWED_GROWTH: u64 = 20;
const RECORD_COMMAND: &str = "cargo xtask verifier-steps --record";

/// `spawnguard doctor --verifier-steps` for `backend`, as JSON, and whether it exited 0.
fn measure(backend: &str, from: Option<&str>) -> (Value, bool) {
    try_measure(backend, from).unwrap_or_else(|e| panic!("{e}"))
}

/// `measure`, or what doctor said when it printed no figures.
fn try_measure(backend: &str, from: Option<&str>) -> Result<(Value, bool), String> {
    let mut cmd = Command::new(spawnguard_bin());
    cmd.args([
        "doctor",
        "--verifier-steps",
        "--backend",
        backend,
        "--output",
        "json",
    ]);
    if let Some(from) = from {
        cmd.args(["--steps-from", from]);
    }
    let out = cmd
        .output()
        .expect("run spawnguard doctor --verifier-steps");
    let json = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "doctor --verifier-steps --backend {backend}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((json, out.status.success()))
}

fn programs(steps: &Value) -> Vec<(String, u64)> {
    steps["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .map(|p| {
            (
                p["program"].as_str().unwrap().to_owned(),
                p["steps"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Every way `steps` breaks the guard, one sentence each.
fn breaches(steps: &Value, record: &Record) -> Vec<String> {
    let kernel = steps["kernel"].as_str().unwrap();
    let mut key = steps["backend"].as_str().unwrap().to_owned();
    if steps["emulated_atomics"] == true {
        key += "+emulated-atomics";
    }
    let limit = steps["limit"].as_u64().unwrap();
    let mut found = Vec::new();
    for (program, n) in programs(steps) {
        if n * 2 >= limit {
            found.push(format!(
                "{program} ({key}, kernel {kernel}): {n} verifier steps, half or more of the \
                 kernel's limit of {limit}"
            ));
        }
    }
    let Some(section) = record.get(kernel) else {
        eprintln!(
            "kernel {kernel} has no record in tests/verifier-steps.toml: only the half-limit \
             check applies ({RECORD_COMMAND} records it)"
        );
        return found;
    };
    let Some(recorded) = section.get(&key) else {
        found.push(format!(
            "kernel {kernel} is recorded without the {key} backend: {RECORD_COMMAND}"
        ));
        return found;
    };
    for (program, n) in programs(steps) {
        match recorded.get(&program) {
            None => found.push(format!(
                "{program} ({key}, kernel {kernel}): {n} verifier steps, not recorded: \
                 {RECORD_COMMAND}"
            )),
            Some(&was) if n * 100 > was * (100 + ALLOWED_GROWTH) => found.push(format!(
                "{program} ({key}, kernel {kernel}): {n} verifier steps, recorded {was} \
                 (+{:.1} %, more than the +{ALLOWED_GROWTH} % allowed): make it cheaper, or \
                 re-record if the growth is meant ({RECORD_COMMAND})",
                (n as f64 / was as f64 - 1.0) * 100.0
            )),
            Some(&was) if n * 100 < was * (100 - ALLOWED_GROWTH) => eprintln!(
                "{program} ({key}): {n} verifier steps, {was} recorded: cheaper, re-record to \
                 keep the guard tight ({RECORD_COMMAND})"
            ),
            Some(_) => {}
        }
    }
    found
}

fn record() -> Record {
    toml::from_str(RECORD).expect("tests/verifier-steps.toml parses")
}

#[test]
fn no_program_grows_past_its_recorded_verifier_steps() {
    if !privileged() {
        return;
    }
    let record = record();
    let mut found = Vec::new();
    for backend in BACKENDS.iter().filter(|b| backend_runs_here(b)) {
        let (steps, ok) = measure(backend, None);
        let breached = breaches(&steps, &record);
        assert!(
            ok || !breached.is_empty(),
            "doctor --verifier-steps --backend {backend} failed without a reason: {steps}"
        );
        eprintln!("{backend}: {:?}", programs(&steps));
        found.extend(breached);
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The guard's own rules, on figures made up for it: a growth just past the allowance, a
/// program missing from the record, half the limit.
#[test]
fn the_guard_names_the_program_and_both_numbers() {
    let record: Record = toml::from_str(
        r#"
["9.9.9-test".kill]
fork = 1000
exit = 1000
"#,
    )
    .unwrap();
    let steps = |fork: u64, exit: u64, extra: Option<u64>| {
        let mut programs = vec![
            serde_json::json!({"program": "fork", "steps": fork}),
            serde_json::json!({"program": "exit", "steps": exit}),
        ];
        if let Some(n) = extra {
            programs.push(serde_json::json!({"program": "new", "steps": n}));
        }
        serde_json::json!({
            "kernel": "9.9.9-test", "backend": "kill", "emulated_atomics": false,
            "limit": 1_000_000, "programs": programs,
        })
    };
    assert!(breaches(&steps(1200, 800, None), &record).is_empty());
    let b = breaches(&steps(1201, 1000, None), &record);
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(
        b[0].starts_with("fork (kill, kernel 9.9.9-test): 1201 verifier steps, recorded 1000"),
        "{b:?}"
    );
    let b = breaches(&steps(1000, 1000, Some(7)), &record);
    assert!(b.len() == 1 && b[0].starts_with("new "), "{b:?}");
    let b = breaches(&steps(1000, 500_000, None), &record);
    assert_eq!(b.len(), 2, "{b:?}");
    assert!(b.iter().any(|s| s.contains("half or more")), "{b:?}");
    // Another kernel: only the limit counts.
    let mut other = steps(5000, 1000, None);
    other["kernel"] = "1.2.3".into();
    assert!(breaches(&other, &record).is_empty());
}

/// The count kernels before 5.16 give (the verifier's log, read through the EMFILE a load with
/// no free descriptor ends in) is the count later ones report in the program info.
#[test]
fn the_verifier_log_and_the_program_info_agree() {
    if !privileged() {
        return;
    }
    let (log, ok) = measure("kill-compat", Some("log"));
    assert!(ok, "{log}");
    assert_eq!(log["from"], "log");
    match try_measure("kill-compat", Some("prog-info")) {
        Ok((info, ok)) => {
            assert!(ok, "{info}");
            assert_eq!(programs(&log), programs(&info));
        }
        // Before 5.16 only the log has the count: the program info must say so.
        Err(e) => assert!(e.contains("did not report the verifier steps"), "{e}"),
    }
    assert!(programs(&log).iter().all(|(_, n)| *n > 0));
}
