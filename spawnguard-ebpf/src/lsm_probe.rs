//! A BPF LSM program that allows everything, loaded only by `spawnguard doctor` to learn
//! whether this kernel runs BPF LSM programs (trampolines allowed, `bpf` an active LSM): what
//! the `lsm` backend needs. It counts its runs: a kernel whose LSM list lacks `bpf` still
//! attaches it, but never runs it.

use aya_ebpf::{macros::lsm, macros::map, maps::Array, programs::LsmContext};

#[map]
static LSM_PROBE_RUNS: Array<u64> = Array::with_max_entries(1, 0);

#[lsm(hook = "task_alloc")]
pub fn lsm_probe(_ctx: LsmContext) -> i32 {
    if let Some(runs) = LSM_PROBE_RUNS.get_ptr_mut(0) {
        // SAFETY: a live map value; a lost increment under a race does not matter here.
        unsafe { *runs += 1 };
    }
    0
}
