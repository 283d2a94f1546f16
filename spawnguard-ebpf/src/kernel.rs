//! Reading kernel structures at offsets the loader took from the running kernel's BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use spawnguard_common::KernelOffsets;

/// Written by the loader before load (`EbpfLoader::override_global`); read-only in the kernel.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_cgroups: 0,
    task_signal: 0,
    css_set_dfl_cgrp: 0,
    cgroup_level: 0,
    cgroup_kn: 0,
    cgroup_ancestors: 0,
    ancestors_are_ids: 0,
    kernfs_node_id: 0,
    signal_live: 0,
    task_flags: 0,
    cgroup_root: 0,
    task_real_parent: 0,
    task_comm: 0,
    kernfs_name: 0,
    task_sighand: 0,
    sighand_action: 0,
    k_sigaction_size: 0,
    k_sigaction_handler: 0,
    k_sigaction_flags: 0,
    task_start_boottime: 0,
};

/// One offset, read alone (a single load from the frozen global): the verifier then holds it
/// as a constant in a register, which a plain load through a BTF pointer needs (see `load`).
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a plain read of our own read-only global; volatile so that the zero
        // placeholder the loader replaces is not folded.
        unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS.$field) }
    };
}

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of our own read-only global; volatile so the compiler does not fold
    // the zero placeholder the loader replaces.
    unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS) }
}

pub type Task = *const u8;
pub type Cgroup = *const u8;

#[inline(always)]
fn read<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-checked accessor; a bad
    // address is an error, not a crash.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// A field read with a plain load, for a pointer whose type the verifier knows from BTF (a BTF
/// tracepoint's argument, or a pointer loaded through one). The offset comes from frozen
/// read-only data, so the verifier sees a constant and checks it against the kernel's BTF at
/// load time, and the JIT guards the load: a bad pointer reads 0 instead of faulting. A
/// `bpf_probe_read_kernel` call costs about as much as a whole one-lookup program here, and
/// the fork program runs for every task on the host (#18).
#[inline(always)]
fn load<T>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above: the verifier checks the access against BTF, and the kernel's
    // exception table turns a fault into 0.
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// (pid, tgid) of a task the verifier knows from BTF (see `load`): the fork tracepoint's child.
#[inline(always)]
pub fn btf_task_ids(task: Task) -> (u32, u32) {
    (
        load::<u32>(task, offset!(task_pid)),
        load::<u32>(task, offset!(task_tgid)),
    )
}

/// `task->cgroups->dfl_cgrp` of a task the verifier knows from BTF (see `load`); null when the
/// task has none (what `place` then reads fails, and the caller fails open).
#[inline(always)]
pub fn btf_task_cgroup(task: Task) -> Cgroup {
    let css_set = load::<*const u8>(task, offset!(task_cgroups));
    load::<*const u8>(css_set, offset!(css_set_dfl_cgrp))
}

/// (pid, tgid) of a task.
#[inline(always)]
pub fn task_ids(task: Task) -> Result<(u32, u32), i32> {
    let o = offsets();
    Ok((
        read::<u32>(task, o.task_pid)?,
        read::<u32>(task, o.task_tgid)?,
    ))
}

/// The task's cgroup on the cgroup2 hierarchy (`task->cgroups->dfl_cgrp`).
#[inline(always)]
pub fn task_cgroup(task: Task) -> Result<Cgroup, i32> {
    let o = offsets();
    let css_set = read::<*const u8>(task, o.task_cgroups)?;
    read::<*const u8>(css_set, o.css_set_dfl_cgrp)
}

/// Threads of the task's process that are not exiting (`signal->live`; a main thread that
/// exited early is not among them, unlike in `nr_threads`).
#[inline(always)]
pub fn task_live_threads(task: Task) -> Result<u32, i32> {
    let o = offsets();
    let signal = read::<*const u8>(task, o.task_signal)?;
    read::<u32>(signal, o.signal_live)
}

/// Writes the name of the task's parent (`task->real_parent->comm`, 16 bytes) to `dst`;
/// zeros when unreadable.
///
/// # Safety
/// `dst` must be valid for writing `TASK_COMM_LEN` bytes, and 8-aligned.
#[inline(always)]
pub unsafe fn parent_comm_into(task: Task, dst: *mut u8) {
    let o = offsets();
    let len = spawnguard_common::TASK_COMM_LEN as u32;
    let copied = match read::<*const u8>(task, o.task_real_parent) {
        // SAFETY: the helper copies `len` bytes through the kernel's fault-checked accessor
        // into `dst` (valid per this function's contract) and zeroes it on failure.
        Ok(parent) => unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                dst.cast(),
                len,
                parent.wrapping_add(o.task_comm as usize).cast(),
            ) == 0
        },
        Err(_) => false,
    };
    if !copied {
        // SAFETY: as above, `dst` is valid for `len` bytes (and 8-aligned, per the contract).
        unsafe { zero_comm(dst) };
    }
}

/// Zeroes a task name (`TASK_COMM_LEN` bytes at an 8-aligned `dst`) with two volatile stores:
/// `write_bytes` is a call to `memset`, a subprogram whose frame kernels before 6.x add to the
/// fork program's 512 bytes of stack.
///
/// # Safety
/// `dst` must be valid for `TASK_COMM_LEN` bytes and 8-aligned.
pub unsafe fn zero_comm(dst: *mut u8) {
    const _: () = assert!(spawnguard_common::TASK_COMM_LEN == 16);
    let words = dst.cast::<u64>();
    // SAFETY: per this function's contract.
    unsafe {
        core::ptr::write_volatile(words, 0);
        core::ptr::write_volatile(words.add(1), 0);
    }
}

const PF_IO_WORKER: u32 = 0x10;
const PF_USER_WORKER: u32 = 0x4000;

/// io_uring and vhost workers: created inside the kernel without the fork tracepoint, so
/// never counted, and their exit must not be uncounted either. `task` must be known to the
/// verifier from BTF (see `load`): every new task's hook asks this.
#[inline(always)]
pub fn is_kernel_created_worker(task: Task) -> bool {
    load::<u32>(task, offset!(task_flags)) & (PF_IO_WORKER | PF_USER_WORKER) != 0
}

/// Whether a cgroup is on the same hierarchy as `other` (used to ignore cgroup v1 events on
/// hybrid hosts: only the cgroup2 hierarchy holds instances).
#[inline(always)]
pub fn same_hierarchy(cgrp: Cgroup, other: Cgroup) -> bool {
    let o = offsets();
    match (
        read::<u64>(cgrp, o.cgroup_root),
        read::<u64>(other, o.cgroup_root),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[inline(always)]
pub fn cgroup_level(cgrp: Cgroup) -> Result<u32, i32> {
    read::<u32>(cgrp, offsets().cgroup_level)
}

#[inline(always)]
pub fn cgroup_id(cgrp: Cgroup) -> Result<u64, i32> {
    let o = offsets();
    let kn = read::<*const u8>(cgrp, o.cgroup_kn)?;
    read::<u64>(kn, o.kernfs_node_id)
}

/// Id of the cgroup's ancestor at `level` (itself at its own level). O(1): the kernel keeps the
/// ancestor array in every cgroup.
#[inline(always)]
pub fn cgroup_ancestor_id(cgrp: Cgroup, level: u32) -> Result<u64, i32> {
    let o = offsets();
    let slot = o.cgroup_ancestors + level * 8;
    if o.ancestors_are_ids != 0 {
        read::<u64>(cgrp, slot)
    } else {
        let ancestor = read::<*const u8>(cgrp, slot)?;
        cgroup_id(ancestor)
    }
}

/// Copies a cgroup directory's name (`cgrp->kn->name`, NUL-terminated) into `dst`, which must
/// be zeroed. Returns whether the whole name fit with room to spare: a name that fills `dst`
/// may have been cut, and never equals a policy's component (at most `PATH_NAME_LEN - 2` bytes).
#[inline(always)]
pub fn cgroup_name_into(cgrp: Cgroup, dst: &mut [u8; spawnguard_common::PATH_NAME_LEN]) -> bool {
    let o = offsets();
    let Ok(kn) = read::<*const u8>(cgrp, o.cgroup_kn) else {
        return false;
    };
    let Ok(name) = read::<*const u8>(kn, o.kernfs_name) else {
        return false;
    };
    // SAFETY: the helper copies at most `dst.len()` bytes into `dst` through the kernel's
    // fault-checked accessor and NUL-terminates what it copied.
    let n = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
            name.cast(),
        )
    };
    n > 0 && (n as usize) < dst.len()
}

const SIGCHLD: u32 = 17;
const SIG_IGN: u64 = 1;
const SA_NOCLDWAIT: u64 = 2;

/// Whether the children of `task`'s process are reaped as they exit (SIGCHLD ignored or
/// `SA_NOCLDWAIT`): then a child of it that dies is never a zombie. False when unreadable.
#[inline(always)]
pub fn reaps_children_at_exit(task: Task) -> bool {
    let o = offsets();
    let Ok(sighand) = read::<*const u8>(task, o.task_sighand) else {
        return false;
    };
    let action = o.sighand_action + (SIGCHLD - 1) * o.k_sigaction_size;
    let handler = read::<u64>(sighand, action + o.k_sigaction_handler);
    let flags = read::<u64>(sighand, action + o.k_sigaction_flags);
    handler == Ok(SIG_IGN) || flags.is_ok_and(|f| f & SA_NOCLDWAIT != 0)
}

/// `task->start_boottime`: when the task was made (ns since boot, as /proc shows it); 0 when
/// unreadable.
#[inline(always)]
pub fn task_start_ns(task: Task) -> u64 {
    read::<u64>(task, offsets().task_start_boottime).unwrap_or(0)
}

/// Whether every thread of the task's process has exited (`signal->live` is 0).
#[inline(always)]
pub fn is_group_dead(task: Task) -> bool {
    task_live_threads(task).is_ok_and(|n| n == 0)
}
