//! Reliability drills (issue 19), privileged and bounded, each printing its figure on a line
//! that starts with `DRILL`:
//!
//! 1. Kill -9 loop: fork, thread and respawn bombs in 20 instances of 3 types while the daemon
//!    is SIGKILLed at random moments (during an install, a `policy apply`, a scrape) and
//!    restarted each time.
//! 2. Policy storm: `policy apply` calls back to back, alternating limits and adding and
//!    removing a type, while churning bombs fork; every admission is checked against the
//!    policies that could have been in force at its fork.
//!
//! CI runs a small size in the first host pass only (the emulated-atomics pass changes
//! nothing they measure). `SG_DRILL_FULL=1` runs the size the issue names (50 kills, 1,000
//! applies in a minute); `SG_DRILL_SEED=N` repeats a run's random moments.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{sleep, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;
use spawnguard_tests::*;

/// Metrics port of the drill daemons (not the default, so a real daemon on the host is safe).
const METRICS: &str = "127.0.0.1:19631";

fn full() -> bool {
    std::env::var("SG_DRILL_FULL").as_deref() == Ok("1")
}

/// Whether this run should drill: privileged, and not the emulated-atomics pass.
fn drills_run_here() -> bool {
    if !privileged() {
        return false;
    }
    if std::env::var_os("SPAWNGUARD_EMULATED_ATOMICS").is_some() {
        eprintln!("skipped: the drills run in the first host pass only");
        return false;
    }
    true
}

/// A small xorshift generator: the drills' random moments, repeatable from the printed seed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("SG_DRILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| monotonic_ns() | 1);
        eprintln!("drill seed: SG_DRILL_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Removes the pinned enforcer when a drill ends, even when it fails.
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = std::process::Command::new(spawnguard_bin())
            .arg("uninstall")
            .output();
    }
}

/// Entries of the maps that hold slots (everything but `created`).
fn slots(s: &Value) -> Vec<(String, u64)> {
    map_entries(s)
        .into_iter()
        .filter(|(m, _)| m != "created")
        .collect()
}

/// Entries of each kernel map, by name.
fn map_entries(s: &Value) -> Vec<(String, u64)> {
    s["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["map"].as_str().unwrap().to_owned(),
                m["entries"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Bombs relaunched in one instance until `stop`: each round's report (stdout) is kept.
/// Each round: (start, end) in ms since `epoch`, and the report.
type Rounds = Vec<(u128, u128, String)>;

fn bomb_rounds(
    dir: PathBuf,
    args: Vec<String>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
) -> JoinHandle<Rounds> {
    std::thread::spawn(move || {
        let mut reports = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let start = epoch.elapsed().as_millis();
            match bomb_in(&dir, &args) {
                Ok(child) => {
                    let out = child.wait_with_output().unwrap();
                    let end = epoch.elapsed().as_millis();
                    reports.push((
                        start,
                        end,
                        String::from_utf8_lossy(&out.stdout).into_owned(),
                    ));
                }
                // The move was refused (a daemon restarting has not let go of anything: a
                // bomb of the previous round may still be leaving): try again shortly.
                Err(_) => sleep(Duration::from_millis(50)),
            }
        }
        reports
    })
}

#[test]
fn drill_1_kill_9_loop() {
    if !drills_run_here() {
        return;
    }
    uninstall();
    let _cleanup = Uninstall;
    let kills = if full() { 50 } else { 10 };
    let mut rng = Rng::new();
    let (rel, tree) = test_type("drill-kill");
    let budget = 20u64;
    let text = format!(
        "{}{}{}[type.breaker]\nstartup_window = \"5s\"\nfailures = 3\nwithin = \"10m\"\n\
         open_for = [\"30m\"]\n",
        policy("kf", &format!("{rel}/kf"), &format!("max_tasks = {budget}")),
        policy("kt", &format!("{rel}/kt"), &format!("max_tasks = {budget}")),
        policy("kr", &format!("{rel}/kr"), "max_tasks = 5"),
    );
    // A `policy apply` the apply-phase kills interrupt: kf's budget lowered (never raised, so
    // the overshoot check below holds `budget` against every phase).
    let lowered = write_policy(
        "drill-kill-apply",
        &text.replace(
            &format!("max_tasks = {budget}\n[[type]]\nname = \"kt\""),
            &format!("max_tasks = {}\n[[type]]\nname = \"kt\"", budget - 4),
        ),
    );
    assert_ne!(fs::read_to_string(&lowered).unwrap(), text);
    let kf: Vec<PathBuf> = (0..7).map(|i| tree.root.join(format!("kf/i{i}"))).collect();
    let kt: Vec<PathBuf> = (0..7).map(|i| tree.root.join(format!("kt/i{i}"))).collect();
    for d in kf.iter().chain(&kt) {
        fs::create_dir_all(d).unwrap();
    }
    fs::create_dir_all(tree.root.join("kr")).unwrap();
    let args = ["--metrics-listen", METRICS];

    // The very first install, killed part-way: nothing enforces until the restart is in place.
    let first_start = Instant::now();
    let mut first = Daemon::spawn_pinned(&text, &args).unwrap();
    // Once it has begun pinning (its `installing` mark is there), a random moment later.
    let installing = Path::new(PIN_DIR).join("installing");
    assert!(
        wait_for(Duration::from_secs(60), || installing.exists()
            || pinned_ready(first.pid())),
        "the first install never began: {}",
        first.log_text()
    );
    sleep(Duration::from_millis(rng.below(30)));
    let killed_at = first_start.elapsed();
    let mid_install = first.try_wait().unwrap().is_none() && !pinned_ready(first.pid());
    first.kill9();
    let restart = Instant::now();
    let mut daemon = Daemon::start_pinned(&text).unwrap();
    let unenforced = first_start.elapsed();
    let install_time = restart.elapsed();
    // Killed after the install began pinning: the restart installs again, never adopting a
    // partial set of hooks.
    let redone = daemon.log_text().contains("half-finished install");
    assert_eq!(redone, mid_install, "{}", daemon.log_text());
    eprintln!(
        "first install killed after {killed_at:?}; restarted and enforcing after {install_time:?}"
    );
    let baseline = status();
    let drift0 = baseline["count_drift"].as_u64().unwrap_or(0);
    let maps0 = map_entries(&baseline);

    // Bombs from here on: the window above is excluded from the overshoot check.
    let stop = Arc::new(AtomicBool::new(false));
    let fork_args: Vec<String> = ["fork", "2000", "4000", "800"].map(String::from).to_vec();
    let thread_args: Vec<String> = ["thread-storm", "2000", "400", "800"]
        .map(String::from)
        .to_vec();
    let mut bombs: Vec<(&str, JoinHandle<Rounds>)> = Vec::new();
    for d in &kf {
        bombs.push((
            "kf",
            bomb_rounds(d.clone(), fork_args.clone(), stop.clone(), first_start),
        ));
    }
    for d in &kt {
        bombs.push((
            "kt",
            bomb_rounds(d.clone(), thread_args.clone(), stop.clone(), first_start),
        ));
    }
    // The respawn loop: a worker that crashes at once, in instances r0..r5 in turn, each
    // removed when it ends (as a supervisor does). The breaker opens after 3 start-up failures
    // and stays open for 30 minutes: exactly 3 may ever run.
    let ran_log = std::env::temp_dir().join(format!("sg-drill-respawn-{}", std::process::id()));
    let _ = fs::remove_file(&ran_log);
    let respawn = {
        let (root, log, stop) = (tree.root.join("kr"), ran_log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut launched = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let dir = root.join(format!("r{}", launched % 6));
                launched += 1;
                fs::create_dir_all(&dir).unwrap();
                let mut cmd = std::process::Command::new("sh");
                cmd.args(["-c", &format!("echo ran >> {}; exit 1", log.display())]);
                cmd.stdout(std::process::Stdio::null());
                if let Ok(mut child) = spawn_in(&dir, cmd) {
                    let _ = child.wait();
                }
                // Wait for the instance to empty (a refused worker dies a moment later).
                wait_for(Duration::from_secs(5), || subtree_procs(&dir).is_empty());
                let _ = fs::remove_dir(&dir);
                sleep(Duration::from_millis(200));
            }
            launched
        })
    };

    // The kill loop: phases in turn, each at a random moment.
    let phases = ["apply", "scrape", "install"];
    let mut figures = Vec::new();
    let mut kill_log: Vec<(u128, String)> = Vec::new();
    let loop_start = Instant::now();
    for i in 0..kills {
        // A random moment of the bombs' rounds.
        sleep(Duration::from_millis(rng.below(600)));
        let phase = phases[i % 3];
        let moment = match phase {
            "install" => {
                daemon.kill9();
                let mut d = Daemon::spawn_pinned(&text, &args).unwrap();
                let ms = rng.below(install_time.as_millis() as u64 + 1);
                sleep(Duration::from_millis(ms));
                let ready = pinned_ready(d.pid());
                d.kill9();
                format!("install+{ms}ms{}", if ready { "(ready)" } else { "" })
            }
            "apply" => {
                let file = lowered.clone();
                let apply = std::thread::spawn(move || {
                    cli(&["policy", "apply", file.to_str().unwrap()]).status
                });
                let ms = rng.below(40);
                sleep(Duration::from_millis(ms));
                daemon.kill9();
                let _ = apply.join();
                format!("apply+{ms}ms")
            }
            _ => {
                let scrape = std::thread::spawn(|| http_get(METRICS, "/metrics").is_ok());
                let ms = rng.below(30);
                sleep(Duration::from_millis(ms));
                daemon.kill9();
                let _ = scrape.join();
                format!("scrape+{ms}ms")
            }
        };
        kill_log.push((first_start.elapsed().as_millis(), moment.clone()));
        figures.push(moment);
        daemon = Daemon::start_pinned(&text).unwrap();
        assert!(
            daemon.log_text().contains("adopted the enforcer"),
            "kill {i} ({phase}): the restart did not adopt: {}",
            daemon.log_text()
        );
    }
    let loop_time = loop_start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let launched = respawn.join().unwrap();

    // No budget passed at any moment, counted from user code.
    let (mut fork_rounds, mut thread_rounds, mut fork_peak, mut thread_peak) = (0, 0, 0, 0);
    let mut overs = Vec::new();
    for (kind, handle) in bombs {
        for (from, to, report) in handle.join().unwrap() {
            if report.trim().is_empty() {
                continue;
            }
            let ran = report_value(&report, "ran");
            // The bomb's two processes hold two of a thread bomb's tasks.
            let most = if kind == "kf" { budget } else { budget - 2 };
            if kind == "kf" {
                fork_rounds += 1;
                fork_peak = fork_peak.max(ran);
            } else {
                thread_rounds += 1;
                thread_peak = thread_peak.max(ran);
            }
            if ran > most {
                let near: Vec<&(u128, String)> = kill_log
                    .iter()
                    .filter(|(at, _)| *at + 3000 >= from && *at <= to)
                    .collect();
                overs.push(format!(
                    "{kind} round {from}..{to} ms ran {ran} at once, most {most}; kills then: \
                     {near:?}; {}",
                    report.trim()
                ));
            }
        }
    }
    assert!(fork_rounds > 0 && thread_rounds > 0);

    // Every check below is gathered, so one run reports everything it found.
    let mut findings = overs.clone();

    // The counts equal the real task counts, with everything held still.
    let mut holds: Vec<Child> = kf
        .iter()
        .map(|d| bomb_in(d, &["fill", "3000", "15", "8000"]).unwrap())
        .chain(
            kt.iter()
                .map(|d| bomb_in(d, &["threads", "3000", "10", "8000"]).unwrap()),
        )
        .collect();
    let all: Vec<&PathBuf> = kf.iter().chain(&kt).collect();
    let mut last = Vec::new();
    let exact = wait_for(Duration::from_secs(6), || {
        let s = status();
        last = all
            .iter()
            .map(|d| {
                use std::os::unix::fs::MetadataExt;
                let id = fs::metadata(d).unwrap().ino();
                let counted = s["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|i| i["id"].as_u64() == Some(id))
                    .map_or(0, |i| i["tasks"].as_u64().unwrap());
                (counted, subtree_threads(d).len() as u64)
            })
            .collect();
        last.iter().all(|&(c, r)| r >= 1 && c == r)
    });
    if !exact {
        for ((d, (c, r)), h) in all.iter().zip(&last).zip(&mut holds) {
            if c != r || *r < 1 {
                findings.push(format!(
                    "{}: spawnguard counts {c} tasks, the kernel lists {r} (hold bomb: {:?})",
                    d.display(),
                    h.try_wait()
                ));
            }
        }
    }
    for d in &all {
        kill_cgroup(d);
    }
    for mut h in holds {
        let _ = h.wait();
    }

    // Nothing left: no slot leaked, no count drifted.
    let mut after = status();
    let mut dead = 0;
    // The daemon's sweep removes records the free hook left (every 5 s, gone at two sweeps).
    let clean = wait_for(Duration::from_secs(30), || {
        after = status();
        dead = dead_process_records();
        ["kf", "kt", "kr"].iter().all(|t| {
            let t = after["types"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == *t)
                .unwrap();
            t["tasks"] == 0 && t["instances"] == 0
        }) && dead == 0
            && slots(&after) == slots(&baseline)
    });
    // The `created` map (instance directories' creation times, not slots) is reported, not
    // checked: removed respawn directories were seen to leave an entry or two behind (see
    // RELIABILITY.md, open finding).
    let created = |s: &Value| {
        map_entries(s)
            .into_iter()
            .find(|(m, _)| m == "created")
            .map_or(0, |(_, n)| n)
    };
    let created_left = created(&after) as i64 - created(&baseline) as i64;
    if !clean {
        findings.push(format!(
            "slots left after the drill: {:?}, before: {maps0:?}; process entries: {}; \
             instances: {}",
            map_entries(&after),
            process_entries(),
            after["instances"]
        ));
    }
    let drift = after["count_drift"].as_u64().unwrap_or(0) - drift0;
    if drift != 0 {
        findings.push(format!("count_drift rose by {drift}"));
    }

    // The breaker is where its history puts it: open after the third start-up failure, once.
    let ran = fs::read_to_string(&ran_log)
        .unwrap_or_default()
        .lines()
        .count();
    let _ = fs::remove_file(&ran_log);
    let out = cli(&["breaker", "status", "kr", "--output", "json"]);
    let b = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone();
    if b["state"] != "open" || b["trips"] != 1 || ran != 3 {
        findings.push(format!(
            "{ran} crashing workers ran; the breaker opens after 3, once: {b}"
        ));
    }

    println!(
        "DRILL kill-9-loop: kills={kills} ({}) in {:.1}s; instances=20 (kf 7 fork, kt 7 thread, \
         kr 6 respawn); first-install kill at {:.0} ms (mid-install: {mid_install}; half-finished install redone: {redone}), unenforced window {:.2}s (excluded); \
         fork rounds={fork_rounds} peak={fork_peak}/{budget} over={}; thread rounds={thread_rounds} \
         peak={thread_peak}/{}; respawns launched={launched} ran={ran} breaker={} trips={}; \
         counts exact={exact}; slot maps back to start={clean}; created entries left={created_left}; \
         dead process records left={dead}; count_drift +{drift}",
        figures.join(","),
        loop_time.as_secs_f64(),
        killed_at.as_secs_f64() * 1e3,
        unenforced.as_secs_f64(),
        overs.len(),
        budget - 2,
        b["state"],
        b["trips"],
    );
    assert!(
        findings.is_empty(),
        "{} findings (first install at 0 ms, bombs from {} ms):\n{}",
        findings.len(),
        unenforced.as_millis(),
        findings.join("\n")
    );
    daemon.stop().unwrap();
}

/// Process records whose process is gone and whose live count is 0. Nothing is counted on
/// them, but they hold entries of the process map: seen after kills during an install in CI
/// (6 after one run; the free hook never removed them, cause not found). The daemon's sweep
/// removes them now; any left is a slot leaked.
fn dead_process_records() -> u64 {
    let map = spawnguard::pinned::processes().unwrap();
    map.iter()
        .filter_map(Result::ok)
        .filter(|(tgid, rec)| rec.live == 0 && !Path::new(&format!("/proc/{tgid}")).exists())
        .count() as u64
}

/// The process map's entries, with what each pid is now (for a leak's report).
fn process_entries() -> String {
    let map = spawnguard::pinned::processes().unwrap();
    map.iter()
        .filter_map(Result::ok)
        .map(|(tgid, rec)| {
            let now = fs::read_to_string(format!("/proc/{tgid}/cmdline"))
                .map(|c| c.replace('\0', " "))
                .unwrap_or_else(|_| "gone".into());
            let cg = fs::read_to_string(format!("/proc/{tgid}/cgroup")).unwrap_or_default();
            format!(
                "tgid {tgid} instance {} live {}: {now} {}",
                rec.instance,
                rec.live,
                cg.lines().find(|l| l.starts_with("0::")).unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether the daemon `pid` has written its state file (its enforcer is in place).
fn pinned_ready(pid: u32) -> bool {
    let state = fs::read_to_string("/run/spawnguard/state.json").unwrap_or_default();
    serde_json::from_str::<Value>(&state).is_ok_and(|v| v["pid"].as_u64() == Some(pid as u64))
}

/// One `policy apply` as the storm made it.
struct Apply {
    sent: u64,
    returned: u64,
    max_tasks: u64,
}

/// The most `max_tasks` that may have been in force at some moment of [a, b]: the policy in
/// force before the first apply, and each apply that started by `b` and was not replaced
/// (its successor returned) before `a`. Applies are made one at a time.
fn most_in_force(initial: u64, applies: &[Apply], a: u64, b: u64) -> u64 {
    let mut most = 0;
    if applies.first().is_none_or(|f| f.returned >= a) {
        most = initial;
    }
    for (i, ap) in applies.iter().enumerate() {
        let replaced_before_a = applies.get(i + 1).is_some_and(|n| n.returned < a);
        if ap.sent <= b && !replaced_before_a {
            most = most.max(ap.max_tasks);
        }
    }
    most
}

/// A churn bomb's ledger: (fork, enter, leave) per process, the spawner first.
fn ledger(report: &str) -> Vec<(u64, u64, u64)> {
    report
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("p ")?.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn drill_2_policy_storm() {
    if !drills_run_here() {
        return;
    }
    let (applies_wanted, span) = if full() {
        (1000, Duration::from_secs(60))
    } else {
        (150, Duration::from_secs(15))
    };
    let (rel, tree) = test_type("drill-storm");
    let (low, high) = ((4u64, 2u64), (12u64, 8u64));
    let limits =
        |(tasks, threads): (u64, u64)| format!("max_tasks = {tasks}\nmax_threads = {threads}");
    // Policy A: both bombed types at `low`, plus a third type; policy B: both at `high`, the
    // third type removed.
    let with = |l: (u64, u64), third: bool| {
        let mut p = format!(
            "{}{}",
            policy("sa", &format!("{rel}/sa"), &limits(l)),
            policy("sb", &format!("{rel}/sb"), &limits(l))
        );
        if third {
            p.push_str(&policy("sc", &format!("{rel}/sc"), "max_tasks = 3"));
        }
        p
    };
    let pol_low = write_policy("drill-storm-low", &with(low, true));
    let pol_high = write_policy("drill-storm-high", &with(high, false));
    let daemon = Daemon::start_with(&with(high, false), &[]).unwrap();
    let dirs: Vec<PathBuf> = ["sa/a0", "sa/a1", "sb/b0", "sb/b1"]
        .iter()
        .map(|d| tree.root.join(d))
        .collect();
    for d in &dirs {
        fs::create_dir_all(d).unwrap();
    }
    fs::create_dir_all(tree.root.join("sc")).unwrap();

    // Churning bombs: children that live 40 ms, forked as fast as the budget lets them.
    let bomb_ms = span.as_millis() as u64 + 2000;
    let bombs: Vec<Child> = dirs
        .iter()
        .map(|d| bomb_in(d, &["churn", &bomb_ms.to_string(), "19000", "40"]).unwrap())
        .collect();

    // A reader that watches the limits in force while the storm runs.
    let stop = Arc::new(AtomicBool::new(false));
    let torn = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (stop, torn) = (stop.clone(), torn.clone());
        std::thread::spawn(move || {
            let (mut reads, mut mixed) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let s = status();
                reads += 1;
                let mut seen = Vec::new();
                let mut third = false;
                for t in s["types"].as_array().unwrap() {
                    third |= t["name"] == "sc";
                    if t["name"] != "sa" && t["name"] != "sb" {
                        continue;
                    }
                    let limits = (
                        t["max_tasks"].as_u64().unwrap(),
                        t["max_threads"].as_u64().unwrap(),
                    );
                    // One type's limits from two policies.
                    if limits != low && limits != high {
                        torn.lock()
                            .unwrap()
                            .push(format!("{}: {limits:?}", t["name"]));
                    }
                    seen.push(limits);
                }
                // Types from two policies in one snapshot (sc comes with the low limits).
                let whole = if third { low } else { high };
                if seen.iter().any(|l| *l != whole) {
                    mixed += 1;
                }
            }
            (reads, mixed)
        })
    };

    // The storm: applies back to back, alternating, paced to `applies_wanted` in `span`.
    let pace = span / applies_wanted;
    let start = Instant::now();
    let mut applies = Vec::new();
    let mut failed = Vec::new();
    for k in 0..applies_wanted {
        let next = start + pace * k;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            sleep(wait);
        }
        let (file, l) = if k % 2 == 0 {
            (&pol_low, low)
        } else {
            (&pol_high, high)
        };
        let sent = monotonic_ns();
        let out = cli(&["policy", "apply", file.to_str().unwrap()]);
        let returned = monotonic_ns();
        if !out.status.success() {
            failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        applies.push(Apply {
            sent,
            returned,
            max_tasks: l.0,
        });
    }
    let storm_time = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (reads, mixed) = reader.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} applies failed: {:?}",
        failed.len(),
        &failed[..1]
    );

    // Every admission against the policies that could have been in force at its fork: the
    // kernel counted at least the processes that had entered before the fork began and had
    // not yet left when this one entered.
    let (mut admitted, mut over, mut past_low) = (0u64, Vec::new(), 0u64);
    for (d, bomb) in dirs.iter().zip(bombs) {
        let out = bomb.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let l = ledger(&report);
        assert!(
            l.len() > 1,
            "{}: the bomb forked nothing: {report}",
            d.display()
        );
        for (i, &(fork, enter, _)) in l.iter().enumerate().skip(1) {
            admitted += 1;
            let counted = 1 + l
                .iter()
                .enumerate()
                .filter(|&(j, &(_, e, leave))| j != i && e < fork && leave > enter)
                .count() as u64;
            let most = most_in_force(high.0, &applies, fork, enter);
            if counted > most {
                over.push(format!(
                    "{}: a process forked in [{fork}, {enter}] made {counted} tasks, at most \
                     {most} in force",
                    d.display()
                ));
            }
            if counted > low.0 {
                past_low += 1;
            }
        }
    }
    let torn = torn.lock().unwrap().clone();

    // Final counts exact: everything has exited.
    for d in &dirs {
        assert!(
            wait_for(Duration::from_secs(10), || instance_counts(d) == (0, 0, 0)),
            "{}: {:?} left",
            d.display(),
            instance_counts(d)
        );
    }
    for t in ["sa", "sb"] {
        let s = type_status(t);
        assert_eq!(s["tasks"], 0, "{s}");
    }
    let in_force = type_status("sa")["max_tasks"].as_u64().unwrap();
    let want = if applies_wanted % 2 == 0 {
        high.0
    } else {
        low.0
    };
    assert_eq!(in_force, want, "the last apply is not the one in force");

    let denied = type_status("sa")["denied"]["max_tasks"].as_u64().unwrap()
        + type_status("sb")["denied"]["max_tasks"].as_u64().unwrap();
    println!(
        "DRILL policy-storm: applies={} in {:.1}s ({:.0}/min, 0 failed), limits {low:?}<->{high:?} \
         (max_tasks, max_threads), type sc added/removed {} times; 4 churn bombs admitted={admitted} \
         (past the low limit while the high one could be in force: {past_low}); over the policy \
         at fork: {}; status reads={reads} torn={} mixed across types={mixed}; denied={denied}",
        applies.len(),
        storm_time.as_secs_f64(),
        applies.len() as f64 * 60.0 / storm_time.as_secs_f64(),
        applies_wanted,
        over.len(),
        torn.len()
    );
    assert!(
        over.is_empty(),
        "{} admitted past the policy: {:?}",
        over.len(),
        &over[..over.len().min(5)]
    );
    assert!(torn.is_empty(), "torn limits seen: {torn:?}");
    assert!(
        past_low > 0 && denied > 0,
        "the storm did not exercise both limits (past low {past_low}, denied {denied})"
    );
    drop(daemon);
}
