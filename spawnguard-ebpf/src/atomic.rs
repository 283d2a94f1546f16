//! The atomic word every decision is made on, on the host (std atomics) and in the kernel
//! (BPF atomic instructions, or their emulation on kernels before 5.12), and the bound on
//! compare-and-swap retries.

use core::cell::UnsafeCell;

/// A u64 updated atomically by every CPU: a counter or timestamp inside a map value.
#[repr(transparent)]
pub struct AtomicU64(UnsafeCell<u64>);

// SAFETY: every access goes through atomic instructions (or, in the emulated-atomics build, the
// atomic add and a lock).
unsafe impl Sync for AtomicU64 {}

#[cfg(all(target_arch = "bpf", not(feature = "emulated-atomics")))]
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
        // load instruction before cpu v4. Under `emulated-atomics` a load needs no lock either:
        // every write is one atomic add.
        #[cfg(target_arch = "bpf")]
        // SAFETY: valid aligned pointer owned by self.
        return unsafe { core::ptr::read_volatile(self.0.get()) };
        #[cfg(not(target_arch = "bpf"))]
        self.std().load(core::sync::atomic::Ordering::SeqCst)
    }

    #[inline(always)]
    pub fn fetch_add(&self, n: u64) -> u64 {
        #[cfg(all(target_arch = "bpf", not(feature = "emulated-atomics")))]
        // SAFETY: valid aligned pointer owned by self.
        return unsafe { atomic_xadd::<u64, u64, { SeqCst }>(self.0.get(), n) };
        #[cfg(all(target_arch = "bpf", feature = "emulated-atomics"))]
        return emulated::fetch_add(self.0.get(), n);
        #[cfg(not(target_arch = "bpf"))]
        self.std()
            .fetch_add(n, core::sync::atomic::Ordering::SeqCst)
    }

    #[inline(always)]
    pub fn fetch_sub(&self, n: u64) -> u64 {
        #[cfg(all(target_arch = "bpf", not(feature = "emulated-atomics")))]
        // SAFETY: valid aligned pointer owned by self.
        return unsafe { atomic_xsub::<u64, u64, { SeqCst }>(self.0.get(), n) };
        #[cfg(all(target_arch = "bpf", feature = "emulated-atomics"))]
        // The value before a subtraction is what `fetch_add` of `-n` returns.
        return emulated::fetch_add(self.0.get(), n.wrapping_neg());
        #[cfg(not(target_arch = "bpf"))]
        self.std()
            .fetch_sub(n, core::sync::atomic::Ordering::SeqCst)
    }

    /// `fetch_sub` whose result decides which CPU was last: the same instruction, except in the
    /// `emulated-atomics` build, where `fetch_sub` only estimates the value before.
    #[inline(always)]
    pub fn fetch_sub_exact(&self, n: u64) -> u64 {
        #[cfg(all(target_arch = "bpf", feature = "emulated-atomics"))]
        return emulated::fetch_add_exact(self.0.get(), n.wrapping_neg());
        #[cfg(not(all(target_arch = "bpf", feature = "emulated-atomics")))]
        self.fetch_sub(n)
    }

    /// Only for words no CPU adds to or compares-and-swaps (the breaker's failure ring): the
    /// `emulated-atomics` build writes the others through an add.
    #[inline(always)]
    pub fn store(&self, v: u64) {
        #[cfg(target_arch = "bpf")]
        // SAFETY: valid aligned pointer owned by self; an aligned 8-byte store is atomic.
        unsafe {
            core::ptr::write_volatile(self.0.get(), v)
        };
        #[cfg(not(target_arch = "bpf"))]
        self.std().store(v, core::sync::atomic::Ordering::SeqCst);
    }

    /// Stores `new` if the value is still `current`; returns the value seen.
    #[inline(always)]
    pub fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        #[cfg(target_arch = "bpf")]
        {
            #[cfg(not(feature = "emulated-atomics"))]
            // SAFETY: valid aligned pointer owned by self.
            let (seen, ok) =
                unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(self.0.get(), current, new) };
            // Without the lock: as if another CPU had won, so the caller retries.
            #[cfg(feature = "emulated-atomics")]
            let (seen, ok) = match emulated::update(self.0.get(), |v| (v == current).then_some(new))
            {
                Some(seen) => (seen, seen == current),
                None => (self.load(), false),
            };
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

/// Kernels before 5.12 have one atomic instruction, an add whose result cannot be read, and
/// BPF tracing and LSM programs may not take a `bpf_spin_lock` there (5.11 added it for LSM
/// only). The `emulated-atomics` build (the object `spawnguard run` loads on them):
/// - a compare-and-swap is exact under a lock that is a key in a hash map (inserting an
///   existing key fails, atomically); the holder writes through the atomic add (`new - old`),
///   so a lock-free add meanwhile is never lost. Without the lock (other CPUs held it for
///   `ATTEMPTS` tries) it fails as if another CPU had won: callers retry, then fail open.
/// - an add is the atomic add, its value before estimated from a read after it; only
///   `fetch_sub_exact` (who was last) takes the lock. Taking it for every add cost the 5.10
///   verifier minutes under emulation.
#[cfg(all(target_arch = "bpf", feature = "emulated-atomics"))]
mod emulated {
    use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::HashMap};

    /// The lock: held while key 0 is present. Every path that inserts it removes it, with no
    /// early return in between (see `update`).
    #[map]
    static ATOMICS_LOCK: HashMap<u32, u32> = HashMap::with_max_entries(1, 0);

    /// Tries before giving up on the lock. It is held for a read, a compare and an add.
    pub const ATTEMPTS: usize = 2;

    #[inline(never)]
    fn lock() -> bool {
        for _ in 0..ATTEMPTS {
            if ATOMICS_LOCK.insert(&0, &0, BPF_NOEXIST.into()).is_ok() {
                return true;
            }
        }
        false
    }

    #[inline(never)]
    fn unlock() {
        let _ = ATOMICS_LOCK.remove(&0);
    }

    /// The atomic add every kernel has (BPF_XADD). Written out: at cpu v3 LLVM emits the
    /// fetching form even for an unused result, and 5.10 refuses that.
    #[inline(always)]
    pub fn add(word: *mut u64, delta: u64) {
        // SAFETY: `word` is a valid aligned map value word (AtomicU64::from_ptr's contract).
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({0} + 0) += {1}",
                in(reg) word,
                in(reg) delta,
                options(nostack)
            )
        };
    }

    /// Under the lock: reads `*word` and, if `f` gives a new value, adds the difference.
    /// Returns the value read, or None when the lock could not be taken (nothing changed).
    #[inline(always)]
    pub fn update(word: *mut u64, f: impl FnOnce(u64) -> Option<u64>) -> Option<u64> {
        if !lock() {
            return None;
        }
        // SAFETY: as in `add`.
        let previous = unsafe { core::ptr::read_volatile(word) };
        if let Some(new) = f(previous) {
            add(word, new.wrapping_sub(previous));
        }
        unlock();
        Some(previous)
    }

    /// Adds `delta` without the lock; returns the value before, estimated from a read after
    /// the add, so it includes what other CPUs added or took meanwhile. A budget check on it
    /// stays safe (the counter read holds every reservation still in force, this one too: never
    /// an overshoot), but two tasks racing for the last unit may both see it taken.
    #[inline(always)]
    pub fn fetch_add(word: *mut u64, delta: u64) -> u64 {
        add(word, delta);
        // SAFETY: as in `add`.
        unsafe { core::ptr::read_volatile(word) }.wrapping_sub(delta)
    }

    /// `fetch_add` with the exact value before, under the lock (estimated without it).
    #[inline(always)]
    pub fn fetch_add_exact(word: *mut u64, delta: u64) -> u64 {
        update(word, |v| Some(v.wrapping_add(delta))).unwrap_or_else(|| fetch_add(word, delta))
    }
}

/// Bound on compare-and-swap retries, so the verifier accepts the loops and no CPU spins.
pub const CAS_ATTEMPTS: usize = 4;

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{sync::Arc, thread, vec::Vec};

    use super::*;

    #[test]
    fn each_operation_returns_the_value_before_it() {
        let a = AtomicU64::new(5);
        assert_eq!(a.fetch_add(3), 5);
        assert_eq!(a.fetch_sub(2), 8);
        assert_eq!(a.fetch_sub_exact(1), 6);
        assert_eq!(a.load(), 5);
        assert_eq!(a.compare_exchange(4, 9), Err(5), "a stale value is refused");
        assert_eq!(a.compare_exchange(5, 9), Ok(5));
        a.store(2);
        assert_eq!(a.load(), 2);
    }

    /// What the counters rely on under contention: no add or subtraction is lost, and of the
    /// compare-and-swaps racing from one value exactly one wins.
    #[test]
    fn racing_adds_are_never_lost_and_one_swap_wins() {
        const THREADS: u64 = 4;
        const ROUNDS: u64 = 20_000;
        let a = Arc::new(AtomicU64::new(0));
        let wins = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (a, wins) = (a.clone(), wins.clone());
                thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        a.fetch_add(3);
                        a.fetch_sub(1);
                    }
                    if a.compare_exchange(THREADS * ROUNDS * 2, u64::MAX).is_ok() {
                        wins.fetch_add(1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        // The swap matches only once every add is in, so the thread whose subtraction came
        // last always wins it, and no other thread can.
        assert_eq!(a.load(), u64::MAX, "an add was lost, or no swap won");
        assert_eq!(wins.load(), 1);
    }
}
