//! `cargo xtask bench`: the cost spawnguard adds to fork, thread creation and syscalls, measured
//! against a baseline in the same run (ratios, not absolute times: the machines are shared).
//!
//! Rounds alternate baseline (no spawnguard) and loaded (daemon running in enforce mode with
//! 1,000 idle instances registered); each measures outside every instance and inside one.
//!
//!   sg-bench [--rounds N (default 7)] [--backend kill|kill-compat|both]
//!   sg-bench measure            (internal: one measurement, printed as key=value)

use std::{fs, path::Path, process::Command, time::Instant};

use spawnguard_tests::{cgroup2_mount, policy, spawnguard_bin, CgroupTree, Daemon};

const FORKS: u32 = 1_000;
const THREADS: u32 = 2_000;
const SYSCALLS: u32 = 1_000_000;
const BATCHES: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn per_op(n: u32, f: impl Fn()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn fork_exit_wait() {
    // SAFETY: the child exits at once with an async-signal-safe call.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn thread_create_join() {
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(|| {})
        .unwrap()
        .join()
        .unwrap();
}

fn getppid() {
    // SAFETY: getppid has no preconditions.
    std::hint::black_box(unsafe { libc::getppid() });
}

fn measure() {
    let fork = median(
        (0..BATCHES)
            .map(|_| per_op(FORKS, fork_exit_wait))
            .collect(),
    );
    let thread = median(
        (0..BATCHES)
            .map(|_| per_op(THREADS, thread_create_join))
            .collect(),
    );
    let syscall = median((0..BATCHES).map(|_| per_op(SYSCALLS, getppid)).collect());
    println!("fork_ns={fork:.0} thread_ns={thread:.0} getppid_ns={syscall:.1}");
}

#[derive(Default, Clone, Copy)]
struct Sample {
    fork: f64,
    thread: f64,
    getppid: f64,
}

fn parse(out: &[u8]) -> Sample {
    let s = String::from_utf8_lossy(out);
    let num = |k: &str| -> f64 {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {s:?}"))
    };
    Sample {
        fork: num("fork_ns"),
        thread: num("thread_ns"),
        getppid: num("getppid_ns"),
    }
}

/// One measurement in a child process placed in `cgroup` (None: where the bench runs).
fn run_measure(cgroup: Option<&Path>) -> Sample {
    let me = std::env::current_exe().unwrap();
    let out = match cgroup {
        None => Command::new(me).arg("measure").output().unwrap(),
        Some(dir) => {
            fs::create_dir_all(dir).unwrap();
            let mut cmd = Command::new(me);
            cmd.arg("measure");
            let dir = dir.to_path_buf();
            // SAFETY: only a write(2) of our pid into cgroup.procs before exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
                })
            };
            cmd.output().unwrap()
        }
    };
    assert!(out.status.success(), "measure failed");
    parse(&out.stdout)
}

/// Per-operation median over the rounds (one noisy round does not move it).
const GATE_RUNS: usize = 50;

/// Wall time of whole `spawnguard gate` runs, as a spawning runtime would pay it.
fn gate_latency_ms() -> Vec<f64> {
    (0..GATE_RUNS)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new(spawnguard_bin())
                .args(["gate", "bench"])
                .output()
                .unwrap();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            assert!(out.status.success(), "gate said no");
            ms
        })
        .collect()
}

fn median_of(v: &[Sample]) -> Sample {
    Sample {
        fork: median(v.iter().map(|s| s.fork).collect()),
        thread: median(v.iter().map(|s| s.thread).collect()),
        getppid: median(v.iter().map(|s| s.getppid).collect()),
    }
}

fn bench_backend(backend: &str, rounds: usize) {
    let rel = "spawnguard-bench/agents";
    let tree = CgroupTree::new(cgroup2_mount().join("spawnguard-bench"));
    let inside = tree.root.join("agents/bench-inside");
    let plain = tree.root.join("plain");
    let text = policy(
        "bench",
        rel,
        "max_tasks = 100000\n[type.breaker]\nstartup_window = \"1s\"",
    );
    let mut gate_ms = Vec::new();
    let (mut base_out, mut base_in, mut load_out, mut load_in) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        eprintln!("round {}/{rounds} ({backend})", round + 1);
        // Baseline: no spawnguard; "inside" is the same measurement in a plain cgroup.
        base_out.push(run_measure(None));
        base_in.push(run_measure(Some(&plain)));
        let daemon = Daemon::start(&text, backend).expect("start the daemon");
        let agents = cgroup2_mount().join(rel);
        for i in 0..1000 {
            fs::create_dir_all(agents.join(format!("idle-{i}"))).unwrap();
        }
        // Registered: known to the kernel (an entry each), idle: no task in them.
        let registered = spawnguard_tests::status()["instances"]
            .as_array()
            .unwrap()
            .len();
        assert!(registered >= 1000, "{registered} instances registered");
        load_out.push(run_measure(None));
        load_in.push(run_measure(Some(&inside)));
        gate_ms.push(gate_latency_ms());
        drop(daemon);
        for i in 0..1000 {
            let _ = fs::remove_dir(agents.join(format!("idle-{i}")));
        }
    }
    let (bo, bi, lo, li) = (
        median_of(&base_out),
        median_of(&base_in),
        median_of(&load_out),
        median_of(&load_in),
    );
    println!(
        "\nbackend {backend}: median of {rounds} alternating rounds, 1,000 idle instances registered"
    );
    println!(
        "| operation | baseline | loaded, outside | ratio | loaded, inside an instance | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, unit: &str, b: f64, bin: f64, o: f64, i: f64| {
        println!(
            "| {name} | {b:.1} {unit} | {o:.1} {unit} | {:.3} | {i:.1} {unit} | {:.3} |",
            o / b,
            i / bin
        );
    };
    row(
        "fork+exit+wait",
        "µs",
        bo.fork / 1e3,
        bi.fork / 1e3,
        lo.fork / 1e3,
        li.fork / 1e3,
    );
    row(
        "pthread create+join",
        "µs",
        bo.thread / 1e3,
        bi.thread / 1e3,
        lo.thread / 1e3,
        li.thread / 1e3,
    );
    row(
        "getppid", "ns", bo.getppid, bi.getppid, lo.getppid, li.getppid,
    );
    println!(
        "\n`spawnguard gate bench` (process start included), median of {} runs: {:.2} ms",
        GATE_RUNS * rounds,
        median(gate_ms.into_iter().flatten().collect())
    );
    drop(tree);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("measure") {
        measure();
        return;
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rounds: usize = flag("--rounds").map_or(7, |r| r.parse().expect("--rounds N"));
    let backends = match flag("--backend").as_deref() {
        None | Some("both") => vec!["kill", "kill-compat"],
        Some(b) => vec![if b == "kill" { "kill" } else { "kill-compat" }],
    };
    assert!(
        spawnguard_bin().exists(),
        "{} missing: run through `cargo xtask bench`",
        spawnguard_bin().display()
    );
    for b in backends {
        bench_backend(b, rounds);
    }
}
