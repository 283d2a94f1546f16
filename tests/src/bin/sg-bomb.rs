//! Bounded bombs for the end-to-end tests. Every mode has a deadline and a total cap of its own,
//! so a bomb that escapes its limits still ends by itself.
//!
//! sg-bomb fork    DEADLINE_MS CAP HOLD_MS   every process forks until the deadline or until CAP
//!                                           attempts in total; all then hold HOLD_MS and exit;
//!                                           prints attempts, failed forks (EAGAIN among them),
//!                                           children forked and how many never reached the end
//! sg-bomb threads DEADLINE_MS CAP HOLD_MS   one process creates up to CAP threads
//! sg-bomb rate    DURATION_MS CAP           fork children that exit at once; prints how many ran
//! sg-bomb clone-into DIR HOLD_MS            clone3(CLONE_INTO_CGROUP) a child into DIR; it holds
//! sg-bomb hold    HOLD_MS                   just sleep (a process to migrate)

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
        "fork" => fork_bomb(arg(2), arg(3), arg(4)),
        "threads" => thread_bomb(arg(2), arg(3), arg(4)),
        "rate" => rate(arg(2), arg(3)),
        "clone-into" => clone_into(&std::env::args().nth(2).expect("DIR"), arg(3)),
        "hold" => std::thread::sleep(Duration::from_millis(arg(2))),
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
}

fn fork_bomb(deadline_ms: u64, cap: u64, hold_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    // SAFETY: a shared anonymous mapping (zero-filled, so all counters start at 0) visible to
    // every forked process.
    let c = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size_of::<BombCounters>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        &*(p as *const BombCounters)
    };
    // SAFETY: children are reaped by the kernel; no handler runs.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let root = std::process::id();
    while Instant::now() < deadline && c.attempts.fetch_add(1, Ordering::Relaxed) < cap {
        // SAFETY: single-threaded process; the child only continues this loop.
        match unsafe { libc::fork() } {
            -1 => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                    c.eagain.fetch_add(1, Ordering::Relaxed);
                }
                // Back off like a real spawner: a refused fork is cheap, and every process
                // retrying at once would starve a small (emulated) machine.
                std::thread::sleep(Duration::from_millis(10));
            }
            0 => {}
            _ => {
                c.forked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let end = deadline + Duration::from_millis(hold_ms);
    sleep_until(end);
    c.exited.fetch_add(1, Ordering::Relaxed);
    if std::process::id() == root {
        // The others end at the same instant: give them time to count themselves.
        sleep_until(end + Duration::from_millis(300));
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        println!(
            "attempts={} failed={} eagain={} forked={} killed={}",
            n(&c.attempts).min(cap),
            n(&c.failed),
            n(&c.eagain),
            n(&c.forked),
            (n(&c.forked) + 1).saturating_sub(n(&c.exited)),
        );
    }
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

fn rate(duration_ms: u64, cap: u64) {
    let start = Instant::now();
    let end = start + Duration::from_millis(duration_ms);
    let (mut ran, mut killed, mut failed) = (0u64, 0u64, 0u64);
    while Instant::now() < end && ran + killed + failed < cap {
        // SAFETY: single-threaded; the child exits immediately without touching Rust state.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe exit in the child.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            failed += 1;
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
        }
    }
    println!(
        "ran={ran} killed={killed} failed={failed} elapsed_ms={}",
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
