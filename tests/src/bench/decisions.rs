//! `sg-bench --only decisions`: what each of spawnguard's programs costs per run, from the
//! kernel's own BPF statistics (`BPF_ENABLE_STATS`: `run_time_ns` / `run_cnt` per program),
//! beside floors measured in the same run on the same hook (an empty program, and one doing a
//! single hash lookup and an atomic add), the pids controller, and stress-ng's bogo-ops.
//!
//! Each case runs a worker (`sg-bench work KIND N`) in its own cgroup and reads every program's
//! statistics before and after: ns per run = Δrun_time_ns / Δrun_cnt, runs per operation =
//! Δrun_cnt / N. The programs run for every fork on the host, so another engineer's forks during
//! a case add runs (a few per thousand here); the ns per run is theirs and ours alike.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use aya::{
    programs::{links::PinnedLink, loaded_programs, BtfTracePoint},
    sys::{enable_stats, Stats},
    Btf, Ebpf,
};
use spawnguard_tests::{cgroup2_mount, CgroupTree, Daemon, PidsCgroup, PIN_DIR};

use super::{
    fork_exit_wait,
    live::{LiveInstances, KEEP_FREE},
    median,
};

static FLOORS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floors.bpf.o"));

/// Operations per worker run.
const OPS: u32 = 2_000;

/// The floor programs, attached to `sched_process_fork` for as long as this lives.
struct Floors {
    ebpf: Ebpf,
}

impl Floors {
    fn attach() -> Self {
        let btf = Btf::from_sys_fs().expect("the kernel's BTF");
        let mut ebpf = Ebpf::load(FLOORS).expect("load the floor programs");
        {
            let mut counts: aya::maps::HashMap<_, u64, u64> =
                aya::maps::HashMap::try_from(ebpf.map_mut("FLOOR_COUNTS").unwrap()).unwrap();
            counts.insert(0, 0, 0).unwrap();
        }
        for name in ["floor_empty", "floor_lookup"] {
            let p: &mut BtfTracePoint = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load("sched_process_fork", &btf).expect("load a floor");
            p.attach().expect("attach a floor");
        }
        Self { ebpf }
    }

    fn ids(&self) -> Vec<(String, u32)> {
        ["floor_empty", "floor_lookup"]
            .iter()
            .map(|n| {
                let id = self.ebpf.program(n).unwrap().info().unwrap().id();
                ((*n).to_owned(), id)
            })
            .collect()
    }
}

/// spawnguard's attached programs, by the name their link is pinned under.
fn spawnguard_ids() -> Vec<(String, u32)> {
    let mut ids = Vec::new();
    for e in fs::read_dir(Path::new(PIN_DIR).join("links")).expect("the pinned links") {
        let e = e.unwrap();
        let link = aya::programs::links::FdLink::from(PinnedLink::from_pin(e.path()).unwrap());
        ids.push((
            e.file_name().to_string_lossy().into_owned(),
            link.info().unwrap().program_id(),
        ));
    }
    ids.sort();
    ids
}

/// (run_time_ns, run_cnt) of every loaded program, by id.
fn stats() -> BTreeMap<u32, (u64, u64)> {
    loaded_programs()
        .flatten()
        .map(|p| (p.id(), (p.run_time().as_nanos() as u64, p.run_count())))
        .collect()
}

/// A program's ns per run and its runs between two [`stats`] snapshots (0 ns when it never ran).
fn delta(
    before: &BTreeMap<u32, (u64, u64)>,
    after: &BTreeMap<u32, (u64, u64)>,
    id: u32,
) -> (f64, f64) {
    let (t0, c0) = before.get(&id).copied().unwrap_or_default();
    let (t1, c1) = after.get(&id).copied().unwrap_or_default();
    let runs = (c1 - c0) as f64;
    let ns = if runs > 0.0 {
        (t1 - t0) as f64 / runs
    } else {
        0.0
    };
    (ns, runs)
}

/// One program's figures in one case.
#[derive(Clone, Copy, Default)]
struct Cost {
    ns_per_run: f64,
    runs_per_op: f64,
}

/// Runs `sg-bench work KIND OPS ARG` in `cgroup` (None: where the bench runs), `workers` of
/// them at once; returns each program's cost per op, by name.
fn case(
    programs: &[(String, u32)],
    cgroup: Option<&Path>,
    kind: &str,
    arg: &str,
    workers: usize,
) -> BTreeMap<String, Cost> {
    let before = stats();
    let children: Vec<_> = (0..workers)
        .map(|_| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args(["work", kind, &OPS.to_string(), arg]);
            if let Some(dir) = cgroup {
                fs::create_dir_all(dir).unwrap();
                let procs = dir.join("cgroup.procs");
                // SAFETY: only a write(2) of our pid into cgroup.procs before exec.
                unsafe {
                    cmd.pre_exec(move || fs::write(&procs, std::process::id().to_string()));
                }
            }
            cmd.spawn().unwrap()
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "worker {kind} in {cgroup:?} failed: {status}"
        );
    }
    let after = stats();
    let ops = f64::from(OPS) * workers as f64;
    programs
        .iter()
        .map(|(name, id)| {
            let (ns_per_run, runs) = delta(&before, &after, *id);
            let cost = Cost {
                ns_per_run,
                runs_per_op: runs / ops,
            };
            (name.clone(), cost)
        })
        .collect()
}

/// The worker: `work KIND N ARG`, run in the case's cgroup.
pub fn work(kind: &str, n: u32, arg: &str) {
    match kind {
        "fork" => (0..n).for_each(|_| fork_exit_wait()),
        // Every fork refused: the child fails (lsm) or is killed before it runs (kill).
        "refused" => {
            for _ in 0..n {
                // SAFETY: the child exits at once with an async-signal-safe call.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: as above.
                    unsafe { libc::_exit(0) };
                }
                if pid > 0 {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                }
            }
        }
        // A new instance each time: a directory made, a child moved into it (admitted at the
        // migration), its exit, the directory removed.
        "instance" => {
            let parent = PathBuf::from(arg);
            for i in 0..n {
                let dir = parent.join(format!("new-{i}"));
                fs::create_dir(&dir).unwrap();
                let procs = std::ffi::CString::new(
                    dir.join("cgroup.procs")
                        .into_os_string()
                        .into_encoded_bytes(),
                )
                .unwrap();
                // SAFETY: the child makes only async-signal-safe calls (open, write, _exit).
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: as above; "0" moves the writer itself.
                    unsafe {
                        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                        let moved = libc::write(fd, c"0".as_ptr().cast(), 1) == 1;
                        libc::_exit(if moved { 0 } else { 1 });
                    }
                }
                assert!(pid > 0);
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(status == 0, "the child could not join {}", dir.display());
                while fs::remove_dir(&dir).is_err() {
                    std::thread::yield_now();
                }
            }
        }
        other => panic!("unknown worker {other}"),
    }
}

const CASES: &[(&str, &str)] = &[
    ("outside", "fork+exit+wait outside every instance"),
    (
        "inside",
        "fork+exit+wait inside an admitted instance, under budget",
    ),
    (
        "inside-2cpu",
        "the same, two workers forking into one instance at once",
    ),
    (
        "breaker",
        "fork+exit+wait inside an instance of a type with a breaker",
    ),
    ("refused", "a fork refused at the budget (max_tasks = 1)"),
    (
        "new-instance",
        "a new instance admitted: mkdir, a child moved in, its exit, rmdir",
    ),
];

/// How many instances a row has registered.
#[derive(Clone, Copy)]
pub enum Scale {
    /// Idle directories: known to the kernel (a creation time each), no task, no instance entry.
    Idle(usize),
    /// Live instances: a task each, so an entry each in the instance map (`live:capacity`: the
    /// map's capacity, less what the cases need for their own instances).
    Live(usize),
}

impl std::str::FromStr for Scale {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n = |v: &str| v.parse().map_err(|e| format!("{v}: {e}"));
        match s.strip_prefix("live:") {
            Some("capacity") => Ok(Self::Live(
                spawnguard_common::MAX_INSTANCES as usize - KEEP_FREE,
            )),
            Some(v) => n(v).map(Self::Live),
            None => n(s).map(Self::Idle),
        }
    }
}

/// The decision costs for `backend` at each count of instances registered, with `types`
/// types in the policy (the three measured ones, and the rest one level deeper, so a task's
/// placement checks two type levels).
pub fn bench(backend: &str, rounds: usize, scales: &[Scale], types: usize) {
    let _stats = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
    let root = cgroup2_mount().join("spawnguard-bench");
    let tree = CgroupTree::new(root.clone());
    let text = "\
[[type]]\nname = \"bench\"\npath = \"spawnguard-bench/agents\"\nmax_tasks = 100000\n\
[[type]]\nname = \"tight\"\npath = \"spawnguard-bench/tight\"\nmax_tasks = 1\n\
[[type]]\nname = \"brk\"\npath = \"spawnguard-bench/brk\"\nmax_tasks = 100000\n\
[type.breaker]\nstartup_window = \"1s\"\n"
        .to_owned()
        + &(3..types.max(3))
            .map(|i| {
                format!(
                    "[[type]]\nname = \"more{i}\"\npath = \"spawnguard-bench/more/t{i}\"\n\
                     max_tasks = 100000\n"
                )
            })
            .collect::<String>();
    let floors = Floors::attach();
    let daemon = Daemon::start(&text, backend).expect("start the daemon");
    // A task held in each measured instance: the instance stays admitted between rounds (an
    // instance that empties within its type's startup_window is a start-up failure, and three
    // of them open the breaker, which then refuses the next round's worker).
    let holders: Vec<_> = [root.join("agents/inside"), root.join("brk/inside")]
        .iter()
        .map(|dir| {
            fs::create_dir_all(dir).unwrap();
            let procs = dir.join("cgroup.procs");
            let mut cmd = Command::new("sleep");
            cmd.arg("3600");
            // SAFETY: only a write(2) of our pid into cgroup.procs before exec.
            unsafe {
                cmd.pre_exec(move || fs::write(&procs, std::process::id().to_string()));
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let mut programs = spawnguard_ids();
    programs.extend(floors.ids());
    let agents = root.join("agents");
    fs::create_dir_all(&agents).unwrap();
    let plain = root.join("plain");
    let mut made = 0;
    println!(
        "\n### decisions, backend {backend}, {} types: ns per run (runs per operation), median of \
         {rounds} rounds of {OPS} operations",
        types.max(3)
    );
    let mut live = None;
    for &scale in scales {
        let label = match scale {
            Scale::Idle(n) => {
                // Idle instance directories: known to the kernel (a creation time each), no
                // task.
                while made < n {
                    fs::create_dir_all(agents.join(format!("idle-{made}"))).unwrap();
                    made += 1;
                }
                format!("{n} idle instances registered")
            }
            Scale::Live(n) => {
                // Replaces the live ones of an earlier row (their tasks killed, reaped and
                // their directories removed first).
                drop(live.take());
                let started = Instant::now();
                live = Some(LiveInstances::start(&agents, n));
                let admitted = spawnguard_tests::type_status("bench")["instances"]
                    .as_u64()
                    .unwrap_or(0);
                format!(
                    "{n} live instances (instance-map entries of the type: {admitted}; made in \
                     {:.1} s) and {made} idle directories",
                    started.elapsed().as_secs_f64()
                )
            }
        };
        let mut all: BTreeMap<&str, Vec<BTreeMap<String, Cost>>> = BTreeMap::new();
        for _ in 0..rounds {
            for (name, _) in CASES {
                let m = match *name {
                    "outside" => case(&programs, Some(&plain), "fork", "", 1),
                    "inside" => case(&programs, Some(&agents.join("inside")), "fork", "", 1),
                    "inside-2cpu" => case(&programs, Some(&agents.join("inside")), "fork", "", 2),
                    "breaker" => case(&programs, Some(&root.join("brk/inside")), "fork", "", 1),
                    "refused" => case(&programs, Some(&root.join("tight/full")), "refused", "", 1),
                    "new-instance" => case(
                        &programs,
                        Some(&plain),
                        "instance",
                        agents.to_str().unwrap(),
                        1,
                    ),
                    _ => unreachable!(),
                };
                all.entry(name).or_default().push(m);
            }
        }
        println!("\n{label}:\n");
        let names: Vec<&String> = programs.iter().map(|(n, _)| n).collect();
        print!("| case |");
        for n in &names {
            print!(" {n} |");
        }
        println!(" spawnguard ns per op | per op ÷ lookup floor |");
        println!("|---|{}---|---|", "---|".repeat(names.len()));
        for (name, what) in CASES {
            let runs = &all[name];
            print!("| {name}: {what} |");
            let mut total = 0.0;
            let mut floor = 0.0;
            for n in &names {
                let ns = median(runs.iter().map(|m| m[*n].ns_per_run).collect());
                let per = median(runs.iter().map(|m| m[*n].runs_per_op).collect());
                if per < 0.005 {
                    print!(" – |");
                } else {
                    print!(" {ns:.0} ({per:.2}) |");
                }
                if n.starts_with("floor_") {
                    if *n == "floor_lookup" {
                        floor = ns;
                    }
                } else {
                    total += ns * per;
                }
            }
            println!(" {total:.0} | {:.1} |", total / floor);
        }
    }
    drop(live);
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    drop(daemon);
    drop(floors);
    drop(tree);
}

/// The pids controller's own cost: fork+exit+wait in a nested pids cgroup (three levels, no
/// limit) against the same in the root, alternating, with nothing of spawnguard loaded.
pub fn pids_anchor(rounds: usize) {
    let nested = PidsCgroup::for_instance("spawnguard-bench/pids/a");
    let v1 = nested.is_v1();
    let me = std::process::id();
    let (mut root_us, mut nested_us) = (Vec::new(), Vec::new());
    let time = || {
        let t = Instant::now();
        for _ in 0..OPS {
            fork_exit_wait();
        }
        t.elapsed().as_nanos() as f64 / f64::from(OPS) / 1e3
    };
    for _ in 0..rounds {
        root_us.push(time());
        nested.join(me);
        if !v1 {
            fs::write(nested.dir.join("cgroup.procs"), me.to_string()).unwrap();
        }
        nested_us.push(time());
        // Back to the root of the pids hierarchy (where this process started).
        let top = nested
            .dir
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap();
        fs::write(top.join("cgroup.procs"), me.to_string()).unwrap();
    }
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() * 3 / 4] - v[v.len() / 4]
    };
    let top = nested.dir.parent().unwrap().parent().unwrap().to_path_buf();
    drop(nested);
    // The v1 guard removes its subtree (`spawnguard-bench/pids`), not the top directory.
    let _ = fs::remove_dir(&top);
    let (r, n) = (median(root_us.clone()), median(nested_us.clone()));
    let noise = spread(&root_us).max(spread(&nested_us));
    println!(
        "\n### pids controller ({}), fork+exit+wait, median of {rounds} alternating rounds of {OPS}\n",
        if v1 { "cgroup v1" } else { "cgroup v2" }
    );
    println!("| where | µs per op | interquartile range |");
    println!("|---|---|---|");
    println!(
        "| root of the pids hierarchy | {r:.1} | {:.1} |",
        spread(&root_us)
    );
    println!(
        "| nested pids cgroup, 3 levels, no limit | {n:.1} | {:.1} |",
        spread(&nested_us)
    );
    let d = (n - r) * 1e3;
    if d.abs() < noise * 1e3 {
        println!(
            "\nnested − root = {d:+.0} ns per fork+exit+wait, within the noise: the pids \
             controller costs less than {:.0} ns per fork+exit here",
            noise * 1e3
        );
    } else {
        println!(
            "\nnested − root = {d:+.0} ns per fork+exit+wait (noise {:.0} ns)",
            noise * 1e3
        );
    }
}

/// stress-ng's bogo-ops per stressor in `cgroup`, run as nobody (`--exec` refuses root).
fn stress(cgroup: &Path, secs: u32) -> BTreeMap<String, f64> {
    fs::create_dir_all(cgroup).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "stress-ng",
    ])
    .args([
        "--fork",
        "1",
        "--vfork",
        "1",
        "--clone",
        "1",
        "--pthread",
        "1",
    ])
    .args(["--exec", "1", "--metrics-brief", "--temp-path", "/tmp"])
    .args(["-t", &format!("{secs}s")])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: only a write(2) of our pid into cgroup.procs before exec.
    unsafe {
        cmd.pre_exec(move || fs::write(&procs, std::process::id().to_string()));
    }
    let out = cmd
        .output()
        .expect("stress-ng (cargo xtask setup installs it)");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stress-ng failed: {text}");
    text.lines()
        .filter_map(|l| {
            let rest = l.split_once("metrc: [")?.1.split_once("] ")?.1;
            let mut w = rest.split_whitespace();
            let name = w.next()?;
            let ops: f64 = w.next()?.parse().ok()?;
            ["fork", "vfork", "clone", "pthread", "exec"]
                .contains(&name)
                .then(|| (name.to_owned(), ops))
        })
        .collect()
}

/// stress-ng's bogo-ops with spawnguard loaded (its workers inside an instance) against none
/// loaded, alternating, and the programs' cost per run under that load.
pub fn stress_ratio(backend: &str, rounds: usize) {
    let _stats = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
    let root = cgroup2_mount().join("spawnguard-bench");
    let tree = CgroupTree::new(root.clone());
    let text =
        "[[type]]\nname = \"bench\"\npath = \"spawnguard-bench/agents\"\nmax_tasks = 100000\n";
    let secs = 5;
    // Bogo-ops per stressor, one map per round.
    let mut base: Vec<BTreeMap<String, f64>> = Vec::new();
    let mut loaded: Vec<BTreeMap<String, f64>> = Vec::new();
    let mut costs: Vec<BTreeMap<String, Cost>> = Vec::new();
    for i in 0..rounds {
        base.push(stress(&root.join(format!("plain-{i}")), secs));
        let daemon = Daemon::start(text, backend).expect("start the daemon");
        let programs = spawnguard_ids();
        let before = stats();
        loaded.push(stress(&root.join(format!("agents/stress-{i}")), secs));
        let after = stats();
        costs.push(
            programs
                .iter()
                .map(|(n, id)| {
                    let (ns, runs) = delta(&before, &after, *id);
                    (
                        n.clone(),
                        Cost {
                            ns_per_run: ns,
                            runs_per_op: runs,
                        },
                    )
                })
                .collect(),
        );
        drop(daemon);
    }
    println!(
        "\n### stress-ng (--fork --vfork --clone --pthread --exec, 1 worker each, {secs} s, as \
         nobody), backend {backend}, median of {rounds} alternating rounds\n"
    );
    println!("| stressor | bogo-ops, none loaded | bogo-ops, inside an instance | ratio |");
    println!("|---|---|---|---|");
    for s in ["fork", "vfork", "clone", "pthread", "exec"] {
        let b = median(base.iter().filter_map(|m| m.get(s).copied()).collect());
        let l = median(loaded.iter().filter_map(|m| m.get(s).copied()).collect());
        println!("| {s} | {b:.0} | {l:.0} | {:.3} |", l / b);
    }
    println!("\nprograms under that load: ns per run (runs in {secs} s)\n");
    println!("| program | ns per run | runs |");
    println!("|---|---|---|");
    for n in costs[0].keys() {
        let ns = median(costs.iter().map(|m| m[n].ns_per_run).collect());
        let runs = median(costs.iter().map(|m| m[n].runs_per_op).collect());
        if runs > 0.0 {
            println!("| {n} | {ns:.0} | {runs:.0} |");
        }
    }
    drop(tree);
}
