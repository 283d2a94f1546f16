//! Bounded bombs for the end-to-end tests. Every mode has a deadline and a total cap of its own,
//! so a bomb that escapes its limits still ends by itself.
//!
//! sg-bomb fork    DEADLINE_MS CAP HOLD_MS   every process forks until the deadline or until CAP
//!                                           attempts in total; all then hold HOLD_MS and exit;
//!                                           prints attempts, failed forks (EAGAIN among them),
//!                                           children forked, how many never reached the end, and
//!                                           how many reached it late (300 ms or more after it)
//! sg-bomb fill    DEADLINE_MS CAP HOLD_MS   like fork, but the hold starts when the CAP-th
//!                                           attempt is made (or at the deadline): a bomb that
//!                                           must fill a budget gets a long deadline without
//!                                           holding for it
//! sg-bomb storm   DEADLINE_MS CAP HOLD_MS   like fork, but a failed fork is retried at once (no
//!                                           back-off); every process counts itself in shared
//!                                           memory at its first line of user code: prints ran=
//!                                           (the first process included)
//! sg-bomb threads DEADLINE_MS CAP HOLD_MS   one process creates up to CAP threads
//! sg-bomb thread-storm DEADLINE_MS CAP HOLD_MS
//!                                           a child process creates threads with no back-off
//!                                           (each counts itself at its first line, in memory
//!                                           it shares with this process, which waits for it:
//!                                           under the kill backends a refused thread takes its
//!                                           process with it); prints ran= and how it ended
//! sg-bomb rate    DURATION_MS CAP           fork children that exit at once; prints how many ran
//! sg-bomb zombies DEADLINE_MS CAP           a spawner forks children that exit at once and
//!                                           never reaps them, with no back-off; this process
//!                                           (a subreaper) waits for it, reaps everything, and
//!                                           prints ran= (children that ran) and killed=
//! sg-bomb mixed   HOLD_MS                   after a byte on stdin: 10 children that hold, 10
//!                                           unreaped zombies, 5 threads, 5 vforks, an io_uring
//!                                           SQPOLL thread; prints "ready io_uring=0|1", holds
//!                                           HOLD_MS, reaps everything and exits
//! sg-bomb clone-into DIR HOLD_MS            clone3(CLONE_INTO_CGROUP) a child into DIR; it holds
//! sg-bomb churn   DEADLINE_MS CAP LIFE_MS   one spawner forks children until the deadline (or CAP
//!                                           children ran), 1 ms apart, a refused fork retried after 2 ms; each
//!                                           child lives LIFE_MS. Prints a ledger line per process
//!                                           that ran ("p FORK ENTER LEAVE", CLOCK_MONOTONIC ns:
//!                                           the spawner's clock before fork(), the child's first
//!                                           line, its last before exit), then ran= failed=
//! sg-bomb hold    HOLD_MS                   just sleep (a process to migrate)
//! sg-bomb spin-join THREADS HOLD_MS         THREADS threads spin in user space (no system
//!                                           call) for HOLD_MS while the main thread waits in
//!                                           pthread_join

use spawnguard_tests::monotonic_ns;
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

fn arg(n: usize) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {n} must be a number; see the usage in the source"))
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "fork" => fork_bomb(arg(2), arg(3), arg(4), Bomb::BackOff),
        "fill" => fork_bomb(arg(2), arg(3), arg(4), Bomb::Fill),
        "storm" => fork_bomb(arg(2), arg(3), arg(4), Bomb::Storm),
        "threads" => thread_bomb(arg(2), arg(3), arg(4)),
        "thread-storm" => thread_storm(arg(2), arg(3), arg(4)),
        "rate" => rate(arg(2), arg(3)),
        "zombies" => zombies(arg(2), arg(3)),
        "mixed" => mixed(arg(2)),
        "clone-into" => clone_into(&std::env::args().nth(2).expect("DIR"), arg(3)),
        "churn" => churn(arg(2), arg(3), arg(4)),
        "hold" => std::thread::sleep(Duration::from_millis(arg(2))),
        "spin-join" => spin_join(arg(2), arg(3)),
        _ => {
            eprintln!("usage: sg-bomb fork|threads|rate|clone-into|hold ...");
            std::process::exit(2);
        }
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Counters every process of a fork bomb shares (one anonymous shared mapping).
#[derive(Default)]
struct BombCounters {
    attempts: AtomicU64,
    /// fork() returned -1 (in any process).
    failed: AtomicU64,
    /// ... with EAGAIN.
    eagain: AtomicU64,
    /// fork() returned a child.
    forked: AtomicU64,
    /// Processes (the first included) that reached their end: the rest were killed.
    exited: AtomicU64,
    /// Processes (the first included) that ran their own code: counted by each child at its
    /// first line after fork() returned, so a child killed before it runs is never counted.
    ran: AtomicU64,
    /// Fork bombs: processes running their own code now (counted in at their first line, out
    /// just before they exit), and the most there ever were at once.
    live: AtomicU64,
    peak: AtomicU64,
    /// `fill`: when the CAP-th attempt was made (CLOCK_MONOTONIC ns; 0 = not yet).
    capped_at: AtomicU64,
}

impl BombCounters {
    /// This process reached its own code.
    fn enter(&self) {
        self.ran.fetch_add(1, Ordering::Relaxed);
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Bomb {
    /// A refused fork is retried after 10 ms, like a real spawner.
    BackOff,
    /// As `BackOff`, but the hold starts when the cap is reached.
    Fill,
    /// No back-off at all.
    Storm,
}

fn fork_bomb(deadline_ms: u64, cap: u64, hold_ms: u64, kind: Bomb) {
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    let deadline_ns = monotonic_ns() + deadline_ms * 1_000_000;
    let c: &BombCounters = shared();
    // SAFETY: children are reaped by the kernel; no handler runs.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let root = std::process::id();
    c.enter();
    loop {
        if Instant::now() >= deadline {
            break;
        }
        if c.attempts.fetch_add(1, Ordering::Relaxed) >= cap {
            let _ =
                c.capped_at
                    .compare_exchange(0, monotonic_ns(), Ordering::SeqCst, Ordering::SeqCst);
            break;
        }
        // SAFETY: single-threaded process; the child only continues this loop.
        match unsafe { libc::fork() } {
            -1 => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                    c.eagain.fetch_add(1, Ordering::Relaxed);
                }
                // Back off like a real spawner: a refused fork is cheap, and every process
                // retrying at once would starve a small (emulated) machine. A storm does not.
                if kind != Bomb::Storm {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            0 => c.enter(),
            _ => {
                c.forked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let hold_ns = hold_ms * 1_000_000;
    if kind == Bomb::Fill {
        // Every process ends at the same instant: the cap's time is shared (the first process
        // to reach it wrote it), so poll it until the hold is over.
        loop {
            let capped = c.capped_at.load(Ordering::SeqCst);
            let end = if capped != 0 { capped } else { deadline_ns } + hold_ns;
            let now = monotonic_ns();
            if now >= end {
                break;
            }
            std::thread::sleep(Duration::from_nanos((end - now).min(10_000_000)));
        }
    } else {
        sleep_until(deadline + Duration::from_millis(hold_ms));
    }
    // Out before the exit: the kernel gives the task's place back later still (at its
    // release), so `peak` never counts more than the kernel did at that moment.
    c.live.fetch_sub(1, Ordering::SeqCst);
    c.exited.fetch_add(1, Ordering::Relaxed);
    if std::process::id() == root {
        // `killed` is the processes that never reached the end, so wait until every other
        // process of the bomb is gone: on a loaded machine one descheduled past the end is
        // late, not killed (4 such were reported "killed" under lsm, where nothing is killed).
        let waited = Instant::now();
        let late_bound = waited + Duration::from_secs(30);
        // Processes still running 300 ms after the end, which this bomb used to count as
        // killed (it slept 300 ms, then counted).
        let mut late = None;
        loop {
            let alive = others_alive();
            if late.is_none() && waited.elapsed() >= Duration::from_millis(300) {
                late = Some(alive.unwrap_or(0));
            }
            match alive {
                Some(0) => break,
                // Unreadable (no cgroup2): the old fixed grace.
                None => {
                    std::thread::sleep(Duration::from_millis(300));
                    break;
                }
                Some(_) if Instant::now() >= late_bound => break,
                Some(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // `ran`: the most processes that ran their own code at once. (A fork slowed past the
        // others' exits on a loaded machine runs after them: counted in `total`, not `ran`.)
        println!(
            "attempts={} failed={} eagain={} forked={} killed={} ran={} total={} late={}",
            n(&c.attempts).min(cap),
            n(&c.failed),
            n(&c.eagain),
            n(&c.forked),
            (n(&c.forked) + 1).saturating_sub(n(&c.exited)),
            n(&c.peak),
            n(&c.ran),
            late.unwrap_or(0),
        );
    }
}

/// Other processes running this program in this process's cgroup (its cgroup2 directory, from
/// /proc/self/cgroup and the cgroup2 mount); None when that cannot be read.
fn others_alive() -> Option<usize> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (fields, fs) = l.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        (fs.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
            .then(|| fields.get(4).copied())?
    })?;
    let procs = std::fs::read_to_string(
        std::path::Path::new(mount).join(format!("{}/cgroup.procs", rel.trim_start_matches('/'))),
    )
    .ok()?;
    let me = std::process::id();
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    Some(
        procs
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .filter(|&pid| pid != me)
            // Only this program's processes: a container's init or a test's helper shares it.
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() == Some(&exe)
            })
            .count(),
    )
}

fn thread_bomb(deadline_ms: u64, cap: u64, hold_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    let end = deadline + Duration::from_millis(hold_ms);
    let mut created = 0;
    let mut failed = 0;
    while Instant::now() < deadline && created + failed < cap {
        match std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || sleep_until(end))
        {
            Ok(_) => created += 1,
            Err(_) => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    println!("created={created} failed={failed}");
    sleep_until(end);
}

/// A shared anonymous mapping of `T`, zero-filled, that forked processes keep sharing.
fn shared<T>() -> &'static T {
    // SAFETY: a fresh shared anonymous mapping (zero-filled: every counter starts at 0), never
    // unmapped, so the reference lives as long as the process.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size_of::<T>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        &*(p as *const T)
    }
}

fn thread_storm(deadline_ms: u64, cap: u64, hold_ms: u64) {
    #[derive(Default)]
    struct Counts {
        attempts: AtomicU64,
        failed: AtomicU64,
        /// Threads that ran their first line.
        ran: AtomicU64,
    }
    let c: &'static Counts = shared();
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    let end = deadline + Duration::from_millis(hold_ms);
    // SAFETY: this process has one thread; the child only runs the storm below and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        while Instant::now() < deadline && c.attempts.fetch_add(1, Ordering::Relaxed) < cap {
            let spawned = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    c.ran.fetch_add(1, Ordering::Relaxed);
                    sleep_until(end);
                });
            if spawned.is_err() {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        sleep_until(end);
        // SAFETY: leaves without running the threads' destructors; they only sleep.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "attempts={} failed={} ran={} killed={}",
        n(&c.attempts).min(cap),
        n(&c.failed),
        n(&c.ran),
        u8::from(libc::WIFSIGNALED(status)),
    );
}

/// Reaps every child (its own, and orphans it adopted as a subreaper) until none is left.
fn reap_all() {
    // SAFETY: waiting for any child of ours.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
}

fn zombies(deadline_ms: u64, cap: u64) {
    #[derive(Default)]
    struct Counts {
        attempts: AtomicU64,
        failed: AtomicU64,
        ran: AtomicU64,
    }
    let c: &'static Counts = shared();
    // Orphans (the spawner's zombies, once it is gone) come to this process, which reaps them.
    // SAFETY: plain prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    // SAFETY: this process has one thread; the child only runs the loop below.
    let spawner = unsafe { libc::fork() };
    assert!(spawner >= 0, "fork: {}", std::io::Error::last_os_error());
    if spawner == 0 {
        while Instant::now() < deadline && c.attempts.fetch_add(1, Ordering::Relaxed) < cap {
            // SAFETY: single-threaded; the child exits at once without touching Rust state.
            match unsafe { libc::fork() } {
                0 => {
                    c.ran.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: async-signal-safe exit in the child.
                    unsafe { libc::_exit(0) };
                }
                -1 => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        // SAFETY: leaves its children unreaped, as the attack does.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(spawner, &mut status, 0) };
    reap_all();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "attempts={} failed={} ran={} killed={}",
        n(&c.attempts).min(cap),
        n(&c.failed),
        n(&c.ran),
        u8::from(libc::WIFSIGNALED(status)),
    );
}

/// io_uring with an SQPOLL thread: the kernel makes a worker task for it. Returns its fd, or
/// None where io_uring is not available (or disabled by sysctl).
fn io_uring_sqpoll() -> Option<i32> {
    // struct io_uring_params: 120 bytes; flags at offset 8, sq_thread_idle at 16.
    let mut params = [0u32; 30];
    const IORING_SETUP_SQPOLL: u32 = 2;
    params[2] = IORING_SETUP_SQPOLL;
    params[4] = 60_000;
    // SAFETY: io_uring_setup(entries, params) with a zeroed, correctly sized params struct.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    (fd >= 0).then_some(fd as i32)
}

fn mixed(hold_ms: u64) {
    let mut go = [0u8; 1];
    // SAFETY: reading one byte from stdin into our own buffer.
    unsafe { libc::read(0, go.as_mut_ptr().cast(), 1) };
    let end = Instant::now() + Duration::from_millis(hold_ms);
    let mut children = Vec::new();
    for _ in 0..10 {
        // SAFETY: single-threaded so far; the child only sleeps and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            sleep_until(end);
            // SAFETY: async-signal-safe exit in the child.
            unsafe { libc::_exit(0) };
        }
        children.push(pid);
    }
    for _ in 0..10 {
        // SAFETY: as above; this child exits at once and stays a zombie until the end.
        if unsafe { libc::fork() } == 0 {
            // SAFETY: async-signal-safe exit in the child.
            unsafe { libc::_exit(0) };
        }
    }
    // vforks: glibc's posix_spawn clones with CLONE_VM | CLONE_VFORK.
    let path = c"/bin/true";
    let argv = [path.as_ptr().cast_mut(), std::ptr::null_mut()];
    for _ in 0..5 {
        let mut pid = 0;
        // SAFETY: a NUL-terminated path and argv, no file actions or attributes, and the
        // environment of this process.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr(),
                std::ptr::null(),
            )
        };
        if rc == 0 {
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
    }
    let threads: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || sleep_until(end)))
        .collect();
    let ring = io_uring_sqpoll();
    println!("ready io_uring={}", u8::from(ring.is_some()));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    sleep_until(end);
    for t in threads {
        let _ = t.join();
    }
    if let Some(fd) = ring {
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    }
    reap_all();
}

fn spin_join(threads: u64, hold_ms: u64) {
    let end = Instant::now() + Duration::from_millis(hold_ms);
    let spinners: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                // Instant::now() reads the vDSO clock: no system call on the way.
                while Instant::now() < end {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for t in spinners {
        let _ = t.join();
    }
}

fn rate(duration_ms: u64, cap: u64) {
    let start = Instant::now();
    let end = start + Duration::from_millis(duration_ms);
    let (mut ran, mut killed, mut failed) = (0u64, 0u64, 0u64);
    // The last refusal: when its fork() was entered, and how many had run before it. A refusal
    // says the bucket was empty when the kernel decided, which is after that time: so at least
    // burst + rate x that time had run by then, however late this process got the CPU.
    let (mut refused_at_us, mut ran_before_refused) = (0u128, 0u64);
    while Instant::now() < end && ran + killed + failed < cap {
        let before = start.elapsed().as_micros();
        // SAFETY: single-threaded; the child exits immediately without touching Rust state.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe exit in the child.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            failed += 1;
            (refused_at_us, ran_before_refused) = (before, ran);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status) {
            ran += 1;
        } else {
            killed += 1;
            (refused_at_us, ran_before_refused) = (before, ran);
        }
    }
    println!(
        "ran={ran} killed={killed} failed={failed} elapsed_ms={} last_refused_us={refused_at_us} \
         ran_before_last_refused={ran_before_refused}",
        start.elapsed().as_millis()
    );
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn clone_into(dir: &str, hold_ms: u64) {
    let dir = std::fs::File::open(dir).expect("open the target cgroup directory");
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: std::os::fd::AsRawFd::as_raw_fd(&dir) as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with a fully initialised argument struct; the child only sleeps and exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        let ts = libc::timespec {
            tv_sec: (hold_ms / 1000) as i64,
            tv_nsec: ((hold_ms % 1000) * 1_000_000) as i64,
        };
        // SAFETY: async-signal-safe calls only in the child.
        unsafe {
            libc::nanosleep(&ts, std::ptr::null_mut());
            libc::_exit(0);
        }
    }
    assert!(pid > 0, "clone3: {}", std::io::Error::last_os_error());
    println!("child={pid}");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    println!("exited={}", libc::WIFEXITED(status));
}

/// Room in the churn ledger (a child past it still runs, unrecorded: the spawner stops at CAP).
const LEDGER: usize = 20_000;

/// One process of `churn`, as it saw its own life (CLOCK_MONOTONIC ns). Zero-filled by
/// `shared`, as is the ledger.
struct Entry {
    fork: AtomicU64,
    enter: AtomicU64,
    leave: AtomicU64,
}

struct Ledger {
    next: AtomicU64,
    failed: AtomicU64,
    entries: [Entry; LEDGER],
}

/// Short-lived children from one spawner, each recording when it was forked, when it reached
/// its own code and when it left: a test bounds what the kernel counted at each fork from it.
fn churn(deadline_ms: u64, cap: u64, life_ms: u64) {
    let l: &'static Ledger = shared();
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    // The spawner holds a slot for the whole run.
    let me = &l.entries[0];
    me.fork.store(0, Ordering::SeqCst);
    me.enter.store(monotonic_ns(), Ordering::SeqCst);
    me.leave.store(u64::MAX, Ordering::SeqCst);
    l.next.store(1, Ordering::SeqCst);
    // Room for the children in flight when the cap is reached.
    let cap = cap.min(LEDGER as u64 - 100);
    let mut forked = 0;
    while Instant::now() < deadline && l.next.load(Ordering::SeqCst) < cap {
        let before = monotonic_ns();
        // SAFETY: single-threaded; the child records itself, sleeps and exits.
        match unsafe { libc::fork() } {
            -1 => {
                l.failed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            0 => {
                let enter = monotonic_ns();
                let i = l.next.fetch_add(1, Ordering::SeqCst) as usize;
                let e = &l.entries[i.min(LEDGER - 1)];
                e.fork.store(before, Ordering::SeqCst);
                e.enter.store(enter, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(life_ms));
                e.leave.store(monotonic_ns(), Ordering::SeqCst);
                // SAFETY: async-signal-safe exit in the child.
                unsafe { libc::_exit(0) };
            }
            _ => {
                forked += 1;
                // Paced: under the kill backends a refused fork returns a child (killed before
                // it runs), so nothing else would slow the spawner down.
                std::thread::sleep(Duration::from_millis(1));
                // Reap what has exited, so zombies do not hold slots past their life.
                // SAFETY: non-blocking wait for any child of ours.
                while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            }
        }
    }
    reap_all();
    me.leave.store(monotonic_ns(), Ordering::SeqCst);
    let n = (l.next.load(Ordering::SeqCst) as usize).min(LEDGER);
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in &l.entries[..n] {
        let _ = writeln!(
            out,
            "p {} {} {}",
            e.fork.load(Ordering::SeqCst),
            e.enter.load(Ordering::SeqCst),
            e.leave.load(Ordering::SeqCst)
        );
    }
    let _ = writeln!(
        out,
        "ran={} failed={} forked={forked}",
        n,
        l.failed.load(Ordering::Relaxed)
    );
}
