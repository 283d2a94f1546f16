//! `cargo xtask bench`: the cost spawnguard adds to fork, thread creation and syscalls, measured
//! against a baseline in the same run (ratios, not absolute times: the machines are shared).
//!
//! Rounds alternate baseline (no spawnguard) and loaded (daemon running in enforce mode with
//! 1,000 idle instances registered); each measures outside every instance and inside one.
//!
//! The scrape benchmark times `GET /metrics` with 0 (the baseline), 1,000 and 10,000
//! instances registered, with the daemon's CPU time per scrape and its resident memory.
//!
//! The decisions benchmark (`--only decisions`, `src/bench/decisions.rs`) reads what each
//! program costs per run from the kernel's BPF statistics, beside floor programs, the pids
//! controller and stress-ng, at 1, 1,000 and 10,000 instances registered (`--scales`).
//!
//!   sg-bench [--rounds N (default 7)] [--backend LIST (lsm,kill,kill-compat; default both kill
//!            backends)] [--only overhead|scrape|decisions|pids|stress|soak] [--scales 1,1000,10000]
//!            [--no-pids (decisions without the pids controller's anchor)] [--types N (default 3)]
//!            [--minutes M --instances N (soak: src/bench/soak.rs; default 30 and 10,000)]
//!   sg-bench measure            (internal: one measurement, printed as key=value)
//!   sg-bench work KIND N ARG    (internal: a decisions worker)

use std::{fs, path::Path, process::Command, time::Instant};

#[path = "../bench/decisions.rs"]
mod decisions;
#[path = "../bench/live.rs"]
mod live;
#[path = "../bench/soak.rs"]
mod soak;

use spawnguard_tests::{
    bomb_bin, cgroup2_mount, http_get, policy, series_count, spawnguard_bin, CgroupTree, Daemon,
};

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

/// Calls of the library's `gate::check` per round (in process: no process start).
const GATE_CALLS: usize = 2_000;

/// Time of one in-process gate check, in µs: `(pinned maps opened per call, pinned maps kept
/// open, gate socket)`.
fn gate_call_us() -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let time = |f: &dyn Fn() -> bool| -> Vec<f64> {
        (0..GATE_CALLS)
            .map(|_| {
                let t = Instant::now();
                assert!(f(), "gate said no");
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect()
    };
    let admitted = |v| matches!(v, Ok(spawnguard::gate::Verdict::Admitted));
    let kept = spawnguard::gate::PinnedGate::open().expect("open the pinned maps");
    (
        time(&|| admitted(spawnguard::gate::check_pinned("bench"))),
        time(&|| admitted(kept.check("bench"))),
        time(&|| admitted(spawnguard::gate::ask_socket("bench"))),
    )
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
    let (mut call_pinned, mut call_kept, mut call_socket) = (Vec::new(), Vec::new(), Vec::new());
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
        // Known to the kernel (a creation time each; an instance entry comes with a first
        // task), idle: no task in them.
        let registered = spawnguard_tests::status()["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == "created")
            .map_or(0, |m| m["entries"].as_u64().unwrap());
        assert!(
            registered >= 1000,
            "{registered} instance directories known"
        );
        load_out.push(run_measure(None));
        load_in.push(run_measure(Some(&inside)));
        gate_ms.push(gate_latency_ms());
        let (pinned, kept, socket) = gate_call_us();
        call_pinned.extend(pinned);
        call_kept.extend(kept);
        call_socket.extend(socket);
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
    println!(
        "`spawnguard::gate::check_pinned` in process (root), median of {} calls: {:.1} µs",
        call_pinned.len(),
        median(call_pinned)
    );
    println!(
        "`spawnguard::gate::PinnedGate::check` in process, maps kept open (root), median of {} \
         calls: {:.1} µs",
        call_kept.len(),
        median(call_kept)
    );
    println!(
        "`spawnguard::gate::ask_socket` in process (a runtime that is not root), median of {} \
         calls: {:.1} µs",
        call_socket.len(),
        median(call_socket)
    );
    drop(tree);
}

/// The daemon's CPU time (user + system) in clock ticks, and its resident memory in KiB.
fn daemon_usage(pid: u32) -> (u64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (ticks, rss)
}

const SCRAPES: usize = 40;
/// Seconds the daemon is left idle at each scale (its CPU time over them).
const IDLE_SECS: u64 = 5;
const SCRAPE_ADDR: &str = "127.0.0.1:19618";

fn bench_scrape() {
    let rel = "spawnguard-bench/scrape";
    let tree = CgroupTree::new(cgroup2_mount().join("spawnguard-bench"));
    let agents = cgroup2_mount().join(rel);
    let text = policy("scrape", rel, "max_tasks = 1000");
    let daemon = Daemon::start_with(
        &text,
        &[
            "--metrics-listen",
            SCRAPE_ADDR,
            "--metrics-instances",
            "top:20",
        ],
    )
    .expect("start the daemon");
    // SAFETY: sysconf has no preconditions.
    let tick_ms = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    println!(
        "\nscrape cost: `GET /metrics` with --metrics-instances top:20, {SCRAPES} scrapes each"
    );
    println!("| instances registered | scrape (median) | ratio to 0 | daemon CPU per scrape | daemon CPU per second idle | daemon RSS | series |");
    println!("|---|---|---|---|---|---|---|");
    let mut holders = Vec::new();
    let mut made = 0;
    let mut baseline = 0.0;
    let mut live = None;
    let capacity = spawnguard_common::MAX_INSTANCES as usize - live::KEEP_FREE;
    for n in [0usize, 1_000, 10_000, capacity] {
        if n == capacity {
            // The instance map full: a live task in each instance (25 of them already).
            live = Some(live::LiveInstances::start(&agents, n - 25));
        }
        while made < n.min(10_000) {
            let dir = agents.join(format!("i{made}"));
            fs::create_dir_all(&dir).unwrap();
            // 25 of them with a live task: the top:20 series then name real instances.
            if made < 25 {
                let mut cmd = Command::new(bomb_bin());
                cmd.args(["hold", "600000"]);
                let procs = dir.join("cgroup.procs");
                // SAFETY: only a write(2) of our pid into cgroup.procs before exec.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        fs::write(&procs, std::process::id().to_string())
                    })
                };
                holders.push(cmd.spawn().unwrap());
            }
            made += 1;
        }
        for _ in 0..3 {
            http_get(SCRAPE_ADDR, "/metrics").unwrap();
        }
        let (ticks0, _) = daemon_usage(daemon.pid());
        let mut times = Vec::new();
        let mut series = 0;
        for _ in 0..SCRAPES {
            let t = Instant::now();
            let body = http_get(SCRAPE_ADDR, "/metrics").unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            series = series_count(&body);
        }
        let (ticks1, rss) = daemon_usage(daemon.pid());
        // Idle: no scrape, nothing forking in the instances, for IDLE_SECS.
        std::thread::sleep(std::time::Duration::from_secs(IDLE_SECS));
        let (ticks2, _) = daemon_usage(daemon.pid());
        let idle_ms = (ticks2 - ticks1) as f64 * tick_ms / IDLE_SECS as f64;
        let ms = median(times);
        if n == 0 {
            baseline = ms;
        }
        let what = if n == capacity {
            format!("{n} live (the instance map's capacity) + {made} idle")
        } else {
            n.to_string()
        };
        println!(
            "| {what} | {ms:.2} ms | {:.2} | {:.2} ms | {idle_ms:.1} ms | {:.1} MB | {series} |",
            ms / baseline,
            (ticks1 - ticks0) as f64 * tick_ms / SCRAPES as f64,
            rss as f64 / 1024.0
        );
    }
    drop(live);
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    drop(daemon);
    drop(tree);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("measure") {
        measure();
        return;
    }
    if args.get(1).map(String::as_str) == Some("work") {
        decisions::work(
            &args[2],
            args[3].parse().expect("work KIND N ARG"),
            args.get(4).map_or("", String::as_str),
        );
        return;
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rounds: usize = flag("--rounds").map_or(7, |r| r.parse().expect("--rounds N"));
    let backends: Vec<String> = match flag("--backend").as_deref() {
        None | Some("both") => vec!["kill".into(), "kill-compat".into()],
        Some(list) => list.split(',').map(str::to_owned).collect(),
    };
    for b in &backends {
        assert!(
            spawnguard_tests::BACKENDS.contains(&b.as_str()),
            "--backend {b}: one of {:?}, comma-separated",
            spawnguard_tests::BACKENDS
        );
    }
    assert!(
        spawnguard_bin().exists(),
        "{} missing: run through `cargo xtask bench`",
        spawnguard_bin().display()
    );
    let only = flag("--only");
    match only.as_deref() {
        Some("decisions") => {
            let scales: Vec<decisions::Scale> = flag("--scales")
                .unwrap_or_else(|| "1,1000,10000".into())
                .split(',')
                .map(|n| n.parse().expect("--scales N,N,live:N|live:capacity"))
                .collect();
            let types: usize = flag("--types").map_or(3, |t| t.parse().expect("--types N"));
            for b in &backends {
                decisions::bench(b, rounds, &scales, types);
            }
            if !args.iter().any(|a| a == "--no-pids") {
                decisions::pids_anchor(rounds.max(7));
            }
            return;
        }
        Some("pids") => return decisions::pids_anchor(rounds),
        Some("soak") => {
            let minutes = flag("--minutes").map_or(30.0, |m| m.parse().expect("--minutes M"));
            let instances =
                flag("--instances").map_or(10_000, |n| n.parse().expect("--instances N"));
            return soak::bench(minutes, instances);
        }
        Some("stress") => {
            for b in &backends {
                decisions::stress_ratio(b, rounds);
            }
            return;
        }
        _ => {}
    }
    if only.as_deref() != Some("scrape") {
        for b in &backends {
            bench_backend(b, rounds);
        }
    }
    if only.as_deref() != Some("overhead") {
        bench_scrape();
    }
}
