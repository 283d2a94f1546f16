//! A BPF LSM program that allows everything, loaded only by `spawnguard doctor` to learn
//! whether this kernel runs BPF LSM programs (trampolines allowed, `bpf` in the LSM list):
//! what the `lsm` backend needs.

use aya_ebpf::{macros::lsm, programs::LsmContext};

#[lsm(hook = "task_alloc")]
pub fn lsm_probe(_ctx: LsmContext) -> i32 {
    0
}
