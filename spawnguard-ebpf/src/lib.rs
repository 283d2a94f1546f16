//! The decision logic of spawnguard, written once: the eBPF programs call these functions in the
//! kernel and the unit tests call the very same functions on the host (with real threads racing
//! on real atomics).
#![no_std]
// The bpf target has no `AtomicU64::fetch_add` (rustc does not mark it as having atomic
// read-modify-write), but the kernel does: use the intrinsics there, std atomics on the host.
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

use core::cell::UnsafeCell;

/// A u64 updated atomically by every CPU: a counter or timestamp inside a map value.
#[repr(transparent)]
pub struct AtomicU64(UnsafeCell<u64>);

// SAFETY: every access goes through atomic instructions.
unsafe impl Sync for AtomicU64 {}

#[cfg(target_arch = "bpf")]
use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xsub, AtomicOrdering::SeqCst};

impl AtomicU64 {
    pub const fn new(v: u64) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// # Safety
    /// `ptr` must be valid, 8-byte aligned, and only accessed atomically for `'a`.
    pub const unsafe fn from_ptr<'a>(ptr: *mut u64) -> &'a Self {
        // SAFETY: repr(transparent) over UnsafeCell<u64>; validity is the caller's promise.
        unsafe { &*ptr.cast::<Self>() }
    }

    #[cfg(not(target_arch = "bpf"))]
    fn std(&self) -> &core::sync::atomic::AtomicU64 {
        // SAFETY: same size and alignment as u64 on 64-bit hosts; only accessed atomically.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(self.0.get()) }
    }

    #[inline(always)]
    pub fn load(&self) -> u64 {
        // An aligned 8-byte load is atomic on BPF; LLVM's BPF backend cannot select an atomic
        // load instruction before cpu v4.
        #[cfg(target_arch = "bpf")]
        // SAFETY: valid aligned pointer owned by self.
        return unsafe { core::ptr::read_volatile(self.0.get()) };
        #[cfg(not(target_arch = "bpf"))]
        self.std().load(core::sync::atomic::Ordering::SeqCst)
    }

    #[inline(always)]
    pub fn fetch_add(&self, n: u64) -> u64 {
        #[cfg(target_arch = "bpf")]
        // SAFETY: valid aligned pointer owned by self.
        return unsafe { atomic_xadd::<u64, u64, { SeqCst }>(self.0.get(), n) };
        #[cfg(not(target_arch = "bpf"))]
        self.std()
            .fetch_add(n, core::sync::atomic::Ordering::SeqCst)
    }

    #[inline(always)]
    pub fn fetch_sub(&self, n: u64) -> u64 {
        #[cfg(target_arch = "bpf")]
        // SAFETY: valid aligned pointer owned by self.
        return unsafe { atomic_xsub::<u64, u64, { SeqCst }>(self.0.get(), n) };
        #[cfg(not(target_arch = "bpf"))]
        self.std()
            .fetch_sub(n, core::sync::atomic::Ordering::SeqCst)
    }

    /// Stores `new` if the value is still `current`; returns the value seen.
    #[inline(always)]
    pub fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        #[cfg(target_arch = "bpf")]
        {
            // SAFETY: valid aligned pointer owned by self.
            let (seen, ok) =
                unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(self.0.get(), current, new) };
            if ok {
                Ok(seen)
            } else {
                Err(seen)
            }
        }
        #[cfg(not(target_arch = "bpf"))]
        self.std().compare_exchange(
            current,
            new,
            core::sync::atomic::Ordering::SeqCst,
            core::sync::atomic::Ordering::SeqCst,
        )
    }
}

/// What a new task is, from the kernel's own point of view: `CLONE_THREAD` children share their
/// parent's thread group id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    Process,
    Thread,
}

#[inline(always)]
pub fn classify(parent_tgid: u32, child_tgid: u32) -> TaskKind {
    if parent_tgid == child_tgid {
        TaskKind::Thread
    } else {
        TaskKind::Process
    }
}

/// Reserve-then-check: adds `n` to `counter` and keeps it only if the result is within `limit`
/// (or `keep_over` is set, as in audit mode). Returns whether the budget held.
///
/// The add happens before the check, so two CPUs racing for the last slot see different previous
/// values and at most one of them wins: zero overshoot without a lock.
#[inline(always)]
pub fn reserve(counter: &AtomicU64, n: u64, limit: u64, keep_over: bool) -> bool {
    let previous = counter.fetch_add(n);
    let within = previous.saturating_add(n) <= limit;
    if !within && !keep_over {
        counter.fetch_sub(n);
    }
    within
}

/// Gives back what `reserve` took.
#[inline(always)]
pub fn release(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n);
}

/// Generic cell-rate algorithm: a token bucket of `burst` tokens refilled one token every
/// `interval_ns`, kept as one timestamp (the theoretical arrival time, `tat`) so it can be
/// updated with a single compare-and-swap. `window_ns` is `interval_ns * burst` (see
/// [`rate_window_ns`]; computed once by the loader, BPF has no 128-bit multiply). Returns the new
/// `tat` when a token is available.
#[inline(always)]
pub fn gcra_take(tat: u64, now: u64, interval_ns: u64, window_ns: u64) -> Option<u64> {
    let start = if tat > now { tat } else { now };
    let next = start.saturating_add(interval_ns);
    if next - now <= window_ns {
        Some(next)
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Taken,
    Empty,
    /// Other CPUs kept winning the compare-and-swap; the caller lets the task through (fail
    /// open) and counts it.
    Contended,
}

/// Bounded so the verifier accepts the loop and a CPU never spins.
pub const TOKEN_CAS_ATTEMPTS: usize = 8;

/// Takes one fork-rate token from the bucket kept in `tat`.
#[inline(always)]
pub fn take_token(tat: &AtomicU64, now: u64, interval_ns: u64, window_ns: u64) -> Token {
    let mut current = tat.load();
    for _ in 0..TOKEN_CAS_ATTEMPTS {
        let Some(next) = gcra_take(current, now, interval_ns, window_ns) else {
            return Token::Empty;
        };
        match tat.compare_exchange(current, next) {
            Ok(_) => return Token::Taken,
            Err(seen) => current = seen,
        }
    }
    Token::Contended
}

/// Which budget refused a new task, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    MaxTasks,
    MaxThreads,
    ForkRate,
}

/// The live counters of one instance, as atomics.
pub struct Counters<'a> {
    pub tasks: &'a AtomicU64,
    pub processes: &'a AtomicU64,
    pub threads: &'a AtomicU64,
    pub rate_tat: &'a AtomicU64,
}

/// The budget a new task (or a migrating process of `n` tasks) is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub max_tasks: u64,
    pub max_threads: u64,
    pub rate_interval_ns: u64,
    /// `rate_interval_ns * burst`.
    pub rate_window_ns: u64,
    pub enforce: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The first budget that did not hold, if any. In audit mode the task is admitted and
    /// counted anyway.
    pub refusal: Option<Refusal>,
    /// The task is counted in the instance (false only for an enforced refusal).
    pub counted: bool,
    pub rate_contended: bool,
}

/// Admits `tasks` new tasks of which `threads` are threads, adding `processes` processes (a fork
/// is 1/0/1, a thread 1/1/0, a migrating process of n tasks n/n-1/1). `rate` says whether the
/// fork-rate bucket applies (new tasks do, migrations do not).
#[inline(always)]
pub fn admit(
    c: &Counters<'_>,
    b: &Budget,
    tasks: u64,
    threads: u64,
    processes: u64,
    rate: bool,
    now: u64,
) -> Admission {
    let keep = !b.enforce;
    let mut refusal = None;
    if !reserve(c.tasks, tasks, b.max_tasks, keep) {
        refusal = Some(Refusal::MaxTasks);
        if b.enforce {
            return Admission {
                refusal,
                counted: false,
                rate_contended: false,
            };
        }
    }
    if threads > 0 && !reserve(c.threads, threads, b.max_threads, keep) {
        if refusal.is_none() {
            refusal = Some(Refusal::MaxThreads);
        }
        if b.enforce {
            release(c.tasks, tasks);
            return Admission {
                refusal,
                counted: false,
                rate_contended: false,
            };
        }
    }
    let mut rate_contended = false;
    if rate && b.rate_interval_ns != 0 {
        match take_token(c.rate_tat, now, b.rate_interval_ns, b.rate_window_ns) {
            Token::Taken => {}
            Token::Contended => rate_contended = true,
            Token::Empty => {
                if refusal.is_none() {
                    refusal = Some(Refusal::ForkRate);
                }
                if b.enforce {
                    release(c.tasks, tasks);
                    if threads > 0 {
                        release(c.threads, threads);
                    }
                    return Admission {
                        refusal,
                        counted: false,
                        rate_contended: false,
                    };
                }
            }
        }
    }
    if processes > 0 {
        c.processes.fetch_add(processes);
    }
    Admission {
        refusal,
        counted: true,
        rate_contended,
    }
}

/// Removes one exiting task from its instance. The last live task of a process uncounts the
/// process; every other task is a thread.
#[inline(always)]
pub fn task_exited(c: &Counters<'_>, last_of_process: bool) {
    release(c.tasks, 1);
    if last_of_process {
        release(c.processes, 1);
    } else {
        release(c.threads, 1);
    }
}

/// Removes a whole process of `live` tasks from its instance (it migrated out).
#[inline(always)]
pub fn process_left(c: &Counters<'_>, live: u64) {
    release(c.tasks, live);
    release(c.processes, 1);
    if live > 1 {
        release(c.threads, live - 1);
    }
}

/// Nanoseconds per token for a rate of `per_sec_milli` thousandths of a token per second.
pub const fn rate_interval_ns(per_sec_milli: u64) -> u64 {
    match 1_000_000_000_000u64.checked_div(per_sec_milli) {
        Some(ns) => ns,
        None => 0,
    }
}

/// The GCRA window for a bucket of `burst` tokens.
pub const fn rate_window_ns(interval_ns: u64, burst: u64) -> u64 {
    interval_ns.saturating_mul(burst)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{sync::Arc, thread, vec::Vec};

    use super::*;

    fn atomics() -> [AtomicU64; 4] {
        [
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        ]
    }

    fn counters(a: &[AtomicU64; 4]) -> Counters<'_> {
        Counters {
            tasks: &a[0],
            processes: &a[1],
            threads: &a[2],
            rate_tat: &a[3],
        }
    }

    const UNLIMITED_RATE: u64 = 0;

    fn budget(max_tasks: u64, max_threads: u64, enforce: bool) -> Budget {
        Budget {
            max_tasks,
            max_threads,
            rate_interval_ns: UNLIMITED_RATE,
            rate_window_ns: 0,
            enforce,
        }
    }

    #[test]
    fn classify_by_thread_group() {
        assert_eq!(classify(100, 100), TaskKind::Thread);
        assert_eq!(classify(100, 101), TaskKind::Process);
    }

    #[test]
    fn reserve_stops_at_limit() {
        let c = AtomicU64::new(0);
        for _ in 0..3 {
            assert!(reserve(&c, 1, 3, false));
        }
        assert!(!reserve(&c, 1, 3, false));
        assert_eq!(c.load(), 3);
        assert!(!reserve(&c, 1, 3, true), "audit keeps the task but reports");
        assert_eq!(c.load(), 4);
        assert!(!reserve(&AtomicU64::new(2), 2, 3, false), "a whole group");
    }

    #[test]
    fn racing_reservations_never_overshoot() {
        for _ in 0..50 {
            let c = Arc::new(AtomicU64::new(0));
            let wins: Vec<_> = (0..8)
                .map(|_| {
                    let c = Arc::clone(&c);
                    thread::spawn(move || (0..1000).filter(|_| reserve(&c, 1, 40, false)).count())
                })
                .collect();
            let won: usize = wins.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(won, 40);
            assert_eq!(c.load(), 40);
        }
    }

    #[test]
    fn gcra_gives_burst_then_rate() {
        let interval = 100;
        let mut tat = 0;
        let now = 1_000_000;
        let mut granted = 0;
        while let Some(next) = gcra_take(tat, now, interval, 500) {
            tat = next;
            granted += 1;
        }
        assert_eq!(granted, 5, "full bucket");
        assert_eq!(gcra_take(tat, now + 99, interval, 500), None);
        assert!(gcra_take(tat, now + 100, interval, 500).is_some());
        // Over a long run: burst + t / interval.
        let (mut tat, mut granted) = (0, 0);
        for now in (now..now + 100_000).step_by(7) {
            if let Some(next) = gcra_take(tat, now, interval, 500) {
                tat = next;
                granted += 1;
            }
        }
        assert!((1004..=1005).contains(&granted), "{granted}");
    }

    #[test]
    fn idle_bucket_refills_to_burst_only() {
        let t = gcra_take(0, 1_000, 10, 30).unwrap();
        let mut tat = t;
        let later = 1_000_000;
        let mut granted = 0;
        while let Some(next) = gcra_take(tat, later, 10, 30) {
            tat = next;
            granted += 1;
        }
        assert_eq!(granted, 3);
    }

    #[test]
    fn racing_tokens_match_burst() {
        let tat = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let tat = Arc::clone(&tat);
                thread::spawn(move || {
                    (0..1000)
                        .filter(|_| take_token(&tat, 5_000, 1_000_000, 20_000_000) != Token::Empty)
                        .count()
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 20);
    }

    #[test]
    fn admit_checks_tasks_then_threads_then_rate() {
        let a = atomics();
        let c = counters(&a);
        let b = budget(3, 1, true);
        assert_eq!(admit(&c, &b, 1, 0, 1, true, 0).refusal, None);
        assert_eq!(admit(&c, &b, 1, 1, 0, true, 0).refusal, None);
        let r = admit(&c, &b, 1, 1, 0, true, 0);
        assert_eq!(r.refusal, Some(Refusal::MaxThreads));
        assert!(!r.counted);
        assert_eq!(admit(&c, &b, 1, 0, 1, true, 0).refusal, None);
        assert_eq!(
            admit(&c, &b, 1, 0, 1, true, 0).refusal,
            Some(Refusal::MaxTasks)
        );
        assert_eq!(a[0].load(), 3);
        assert_eq!(a[1].load(), 2);
        assert_eq!(a[2].load(), 1);
    }

    #[test]
    fn rate_refusal_gives_back_the_slot() {
        let a = atomics();
        let c = counters(&a);
        let b = Budget {
            rate_interval_ns: 1_000,
            rate_window_ns: 1_000,
            ..budget(10, 10, true)
        };
        assert!(admit(&c, &b, 1, 0, 1, true, 0).counted);
        let r = admit(&c, &b, 1, 0, 1, true, 0);
        assert_eq!(r.refusal, Some(Refusal::ForkRate));
        assert_eq!(a[0].load(), 1);
        assert!(admit(&c, &b, 1, 0, 1, false, 0).counted, "migration");
    }

    #[test]
    fn audit_counts_and_reports() {
        let a = atomics();
        let c = counters(&a);
        let b = budget(1, 0, false);
        assert!(admit(&c, &b, 1, 0, 1, true, 0).counted);
        let r = admit(&c, &b, 1, 1, 0, true, 0);
        assert_eq!(r.refusal, Some(Refusal::MaxTasks));
        assert!(r.counted);
        assert_eq!(a[0].load(), 2);
        assert_eq!(a[2].load(), 1);
    }

    #[test]
    fn exits_and_migrations_balance() {
        let a = atomics();
        let c = counters(&a);
        let b = budget(10, 10, true);
        admit(&c, &b, 1, 0, 1, true, 0);
        admit(&c, &b, 1, 1, 0, true, 0);
        admit(&c, &b, 1, 1, 0, true, 0);
        task_exited(&c, false);
        process_left(&c, 2);
        assert!(a[..3].iter().all(|x| x.load() == 0));
        assert!(admit(&c, &b, 4, 3, 1, false, 0).counted);
        for _ in 0..3 {
            task_exited(&c, false);
        }
        task_exited(&c, true);
        assert!(a[..3].iter().all(|x| x.load() == 0));
    }

    #[test]
    fn interval_from_rate() {
        assert_eq!(rate_interval_ns(2_000), 500_000_000);
        assert_eq!(rate_interval_ns(0), 0);
    }
}
