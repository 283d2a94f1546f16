//! spawnguard's kernel side: one module per hook. Every hook decides in O(1) from maps and never
//! waits on userspace; anything it cannot decide (a full map, an unreadable field) lets the task
//! through, counted and reported.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod cgroup_attach_task;
#[cfg(target_arch = "bpf")]
mod cgroup_dir;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod lsm_probe;
#[cfg(target_arch = "bpf")]
mod sched_process_exit;
#[cfg(target_arch = "bpf")]
mod sched_process_fork;
#[cfg(target_arch = "bpf")]
mod sched_process_free;
#[cfg(target_arch = "bpf")]
mod settle;
#[cfg(target_arch = "bpf")]
mod state;
#[cfg(target_arch = "bpf")]
mod sys_exit;
#[cfg(target_arch = "bpf")]
mod task_alloc;
#[cfg(target_arch = "bpf")]
mod task_free;
#[cfg(target_arch = "bpf")]
mod task_newtask;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// The eBPF object is only meaningful for `bpfel-unknown-none`; on the host this binary is empty
/// so the workspace builds and the decision logic (the library) is unit-tested.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
