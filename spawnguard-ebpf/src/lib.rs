//! The decision logic of spawnguard, written once: the eBPF programs call these functions in the
//! kernel and the unit tests call the very same functions on the host (with real threads racing
//! on real atomics).
//!
//! One module per decision, each with its unit tests: `atomic` (the atomic word, and its
//! emulation on kernels before 5.12), `admission` (budgets: admitting a new task or a process
//! moving in, and releasing what leaves), `rate` (the fork-rate bucket) and `breaker` (the
//! circuit breaker); what a new task is, and two small helpers, here. Everything is re-exported
//! at the crate root, so callers write `spawnguard_ebpf::admit`.
#![no_std]
// The bpf target has no `AtomicU64::fetch_add` (rustc does not mark it as having atomic
// read-modify-write), but the kernel does: use the intrinsics there, std atomics on the host.
#![cfg_attr(
    all(target_arch = "bpf", not(feature = "emulated-atomics")),
    feature(core_intrinsics),
    allow(internal_features)
)]
// The plain atomic add (no fetch) of kernels before 5.12, which LLVM does not emit at cpu v3.
#![cfg_attr(
    all(target_arch = "bpf", feature = "emulated-atomics"),
    feature(asm_experimental_arch)
)]

mod admission;
mod atomic;
mod breaker;
mod rate;

pub use admission::*;
pub use atomic::*;
pub use breaker::*;
pub use rate::*;

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

/// Whether an instance created at `created_ns` is past `max_age_ns` at `now`.
#[inline(always)]
pub const fn past_max_age(created_ns: u64, now: u64, max_age_ns: u64) -> bool {
    now > created_ns && now - created_ns > max_age_ns
}

/// Index of a type's slot on one side of the double-buffered policy maps (`POLICY_SIDES`).
pub const fn policy_index(side: u32, type_idx: u32) -> u32 {
    (side & 1) * spawnguard_common::MAX_TYPES + type_idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_by_thread_group() {
        assert_eq!(classify(100, 100), TaskKind::Thread);
        assert_eq!(classify(100, 101), TaskKind::Process);
    }

    #[test]
    fn age_counts_from_creation() {
        assert!(!past_max_age(100, 150, 60));
        assert!(past_max_age(100, 161, 60));
        assert!(
            !past_max_age(200, 100, 60),
            "clock before creation: not aged"
        );
        assert!(!past_max_age(0, u64::MAX - 1, u64::MAX), "no limit");
    }
}
