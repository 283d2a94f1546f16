//! lsm backend only: decides every new task before it exists. A refused `fork()`, `clone()` or
//! `pthread_create()` fails in the caller with EAGAIN, as at `pids.max`; nothing is killed. An
//! admitted task is charged here and kept in PENDING until the fork tracepoint records it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::lsm,
    programs::LsmContext,
};
use spawnguard_common::{
    PendingTask, CAUSE_FORK, CAUSE_THREAD, FAIL_CONTENDED, FAIL_INSTANCES_FULL, PENDING_COUNTED,
    PENDING_THREAD,
};
use spawnguard_ebpf::{release_tasks, Admission};

use crate::{
    kernel::{self, Task},
    state::{
        abandon_probe, admit_process, admit_thread, admit_thread_anyway, budget, counters,
        fail_open, instance, place, record, Report, INSTANCES, PENDING, PROCESSES,
    },
};

const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const EAGAIN: i32 = 11;

/// `task_alloc(struct task_struct *task, unsigned long clone_flags)`, in `copy_process` before
/// the child has a pid or its final cgroup; `current` is the spawner.
#[lsm(hook = "task_alloc")]
pub fn task_alloc(ctx: LsmContext) -> i32 {
    let child: Task = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        // Another BPF LSM program refused it already.
        return previous;
    }
    // A child cloned into another cgroup is placed where it is born, which is not known yet:
    // the fork tracepoint decides it. Kernel-created workers are never counted.
    if flags & CLONE_INTO_CGROUP != 0 || kernel::is_kernel_created_worker(child) {
        return 0;
    }
    if flags & CLONE_THREAD != 0 {
        new_thread(child)
    } else {
        new_process(child)
    }
}

#[inline(always)]
fn report(cause: u32, type_idx: u32, instance: u64) -> Report {
    Report {
        cause,
        type_idx,
        instance,
        // The task never got a pid; the event's pid/comm name the spawner.
        target_pid: 0,
    }
}

/// Remembers a decided task for the fork tracepoint. False when PENDING is full: the fork
/// tracepoint then decides the task the way the kill backends do.
#[inline(always)]
fn pend(child: Task, instance: u64, type_idx: u32, flags: u32) -> bool {
    let p = PendingTask {
        instance,
        type_idx,
        flags,
    };
    PENDING
        .insert(&(child as u64), &p, BPF_NOEXIST as u64)
        .is_ok()
}

#[inline(always)]
fn verdict(adm: &Admission) -> i32 {
    if adm.counted || adm.contended {
        0
    } else {
        -EAGAIN
    }
}

/// A thread counts where its process is counted: one hash lookup for every process outside.
#[inline(always)]
fn new_thread(child: Task) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(rec) = PROCESSES.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: live map value, plain read.
    let inst = unsafe { (*rec).instance };
    let Some(state) = INSTANCES.get_ptr_mut(&inst) else {
        return 0;
    };
    // SAFETY: live map value, plain read.
    let type_idx = unsafe { (*state).type_idx };
    let (Some(b), Some(c)) = (budget(type_idx), counters(state, type_idx)) else {
        return 0;
    };
    let r = report(CAUSE_THREAD, type_idx, inst);
    let mut adm = admit_thread(&c, &b, state, &r);
    if adm.contended {
        // Fail open: count it after all, or let it through uncounted (`record` reports it
        // once, as contended, when it stays uncounted).
        adm = admit_thread_anyway(&c, &b, state, &r);
        if adm.counted {
            fail_open(FAIL_CONTENDED, &r);
        }
        adm.contended = !adm.counted;
    }
    let flags = PENDING_THREAD | if adm.counted { PENDING_COUNTED } else { 0 };
    if (adm.counted || adm.contended) && !pend(child, inst, type_idx, flags) {
        if adm.counted {
            release_tasks(&c, 1, 1, 0);
        }
        return 0;
    }
    record(&adm, &b, &c, &r);
    verdict(&adm)
}

#[inline(always)]
fn new_process(child: Task) -> i32 {
    // Without CLONE_INTO_CGROUP the child is born where its parent runs. (Its own css_set is
    // still `init_css_set` here: `cgroup_fork` set it, the real one comes later.)
    // SAFETY: the helper returns the current task, valid for this program run.
    let parent = unsafe { bpf_get_current_task() } as Task;
    let Ok(Some(mut placement)) = kernel::task_cgroup(parent).and_then(place) else {
        // Outside every instance, or unreadable: the fork tracepoint looks again.
        return 0;
    };
    let Some(state) = instance(&mut placement) else {
        fail_open(
            FAIL_INSTANCES_FULL,
            &report(CAUSE_FORK, placement.type_idx, placement.instance),
        );
        let _ = pend(child, placement.instance, placement.type_idx, 0);
        return 0;
    };
    let r = report(CAUSE_FORK, placement.type_idx, placement.instance);
    let Some(b) = budget(placement.type_idx) else {
        return 0;
    };
    let Some(c) = counters(state, placement.type_idx) else {
        return 0;
    };
    let adm = admit_process(&c, &b, state, &r);
    let flags = if adm.counted { PENDING_COUNTED } else { 0 };
    if (adm.counted || adm.contended) && !pend(child, placement.instance, placement.type_idx, flags)
    {
        if adm.counted && release_tasks(&c, 1, 0, 1).closed {
            abandon_probe(&r);
        }
        return 0;
    }
    record(&adm, &b, &c, &r);
    verdict(&adm)
}
