//! `sg-bench --only soak [--minutes 30] [--instances 10000]` (issue 19, drill 7): instances
//! with churning tasks for a long time, and the daemon watched meanwhile. A churn worker moves a
//! new process into each instance in turn; that process forks `FORKS_PER_VISIT` children that
//! exit at once, reaps them and exits. Every `SAMPLE` the daemon's RSS, its CPU time and one
//! scrape are read. At the end the churn stops and the counts must come back to 0 with the
//! kernel's counters equal to what the worker did: moves in = visits, forks = visits ×
//! `FORKS_PER_VISIT`, and no drift.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use spawnguard_tests::{
    cgroup2_mount, http_get, policy, status, type_status, wait_for, CgroupTree, Daemon,
};

use super::{daemon_usage, median};

const FORKS_PER_VISIT: u64 = 3;
const SAMPLE: Duration = Duration::from_secs(10);
const ADDR: &str = "127.0.0.1:19619";

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// One visit: a process moved into `procs`' instance forks and reaps its children, then exits.
/// Returns whether it ran to its end.
fn visit(procs: &CString) -> bool {
    // SAFETY: the child makes only system calls on memory prepared before the fork and leaves
    // with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(2);
            }
            libc::close(fd);
            for _ in 0..FORKS_PER_VISIT {
                let c = libc::fork();
                if c == 0 {
                    libc::_exit(0);
                }
                if c > 0 {
                    libc::waitpid(c, std::ptr::null_mut(), 0);
                }
            }
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return false;
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

pub fn bench(minutes: f64, instances: usize) {
    let rel = "spawnguard-bench/soak";
    let tree = CgroupTree::new(cgroup2_mount().join("spawnguard-bench"));
    let agents = cgroup2_mount().join(rel);
    // Budgets the churn never reaches: what is measured is the daemon, not a refusal.
    let text = policy("soak", rel, "max_tasks = 64");
    let daemon = Daemon::start_with(&text, &["--metrics-listen", ADDR]).expect("start the daemon");
    let procs: Vec<CString> = (0..instances)
        .map(|i| {
            let dir = agents.join(format!("i{i}"));
            fs::create_dir_all(&dir).unwrap();
            CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap()
        })
        .collect();
    let before = type_status("soak");
    let drift0 = status()["count_drift"].as_u64().unwrap_or(0);
    let failed0 = status()["failed_open"].as_u64().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let tick_ms = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;

    static STOP: AtomicBool = AtomicBool::new(false);
    static VISITS: AtomicU64 = AtomicU64::new(0);
    static FAILED: AtomicU64 = AtomicU64::new(0);
    let churn = std::thread::spawn(move || {
        let mut i = 0;
        while !STOP.load(Ordering::Relaxed) {
            if visit(&procs[i % procs.len()]) {
                VISITS.fetch_add(1, Ordering::Relaxed);
            } else {
                FAILED.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
    });

    println!(
        "\n### soak: {instances} instances, churning, {minutes} min (a sample every {} s)\n",
        SAMPLE.as_secs()
    );
    println!("| minute | visits | daemon RSS | daemon CPU per second | scrape |");
    println!("|---|---|---|---|---|");
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(minutes * 60.0);
    let (mut ticks, _) = daemon_usage(daemon.pid());
    let mut samples: Vec<(f64, f64, f64, f64)> = Vec::new();
    while Instant::now() < end {
        std::thread::sleep(SAMPLE);
        let (t, rss) = daemon_usage(daemon.pid());
        let cpu = (t - ticks) as f64 * tick_ms / SAMPLE.as_secs_f64();
        ticks = t;
        let s = Instant::now();
        http_get(ADDR, "/metrics").unwrap();
        let scrape = s.elapsed().as_secs_f64() * 1000.0;
        let minute = start.elapsed().as_secs_f64() / 60.0;
        samples.push((minute, rss as f64, cpu, scrape));
        println!(
            "| {minute:.1} | {} | {:.1} MB | {cpu:.0} ms | {scrape:.1} ms |",
            VISITS.load(Ordering::Relaxed),
            rss as f64 / 1024.0
        );
    }
    STOP.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let visits = VISITS.load(Ordering::Relaxed);
    // A state: every task gone and every entry given back (bounded).
    let settled = wait_for(Duration::from_secs(60), || {
        let t = type_status("soak");
        t["tasks"] == 0 && t["instances"] == 0
    });
    let after = type_status("soak");
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let moved = n(&after, "migrations_in") - n(&before, "migrations_in");
    let forks = n(&after, "forks_allowed") - n(&before, "forks_allowed");
    let drift = status()["count_drift"].as_u64().unwrap_or(0) - drift0;
    let failed_open = status()["failed_open"].as_u64().unwrap_or(0) - failed0;
    // Past the first tenth (start-up and the maps' first growth).
    let steady: Vec<_> = samples
        .iter()
        .filter(|s| s.0 >= minutes / 10.0)
        .copied()
        .collect();
    let rss_slope = slope(&steady.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>());
    let cpu_slope = slope(&steady.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>());
    let third = (steady.len() / 3).max(1);
    let scrape_first = median(steady.iter().take(third).map(|s| s.3).collect());
    let scrape_last = median(steady.iter().rev().take(third).map(|s| s.3).collect());
    println!(
        "\nsoak: {visits} visits ({} failed), {} tasks churned in {:.1} min; daemon RSS slope \
         {rss_slope:+.1} KiB/min, CPU slope {cpu_slope:+.2} ms/s per min, scrape median {:.1} ms \
         (first third) / {:.1} ms (last third); settled to 0 tasks and 0 instances: {settled}; \
         moves in counted {moved} of {visits}, forks counted {forks} of {}, count drift \
         {drift:+}, fail-opens {failed_open}",
        FAILED.load(Ordering::Relaxed),
        visits * (1 + FORKS_PER_VISIT),
        start.elapsed().as_secs_f64() / 60.0,
        scrape_first,
        scrape_last,
        visits * FORKS_PER_VISIT,
    );
    drop(daemon);
    drop(tree);
    assert!(settled, "the counts did not come back to 0: {after}");
    assert_eq!(moved, visits, "moves into the instances counted");
    assert_eq!(forks, visits * FORKS_PER_VISIT, "forks counted");
    assert_eq!(drift, 0, "count drift");
}
