//! Every new task: count it in its instance, or deny it when a budget does not hold.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use spawnguard_common::{
    ProcessRecord, CAUSE_FORK, CAUSE_THREAD, FAIL_DOOMED_FULL, FAIL_INSTANCES_FULL,
    FAIL_PROCESSES_FULL, FAIL_READ_ERROR,
};
use spawnguard_ebpf::{admit, classify, process_left, TaskKind};

use crate::{
    kernel::{self, Task},
    state::{
        budget, counters, doom, fail_open, instance, needs_doom, now, process_live, record,
        stop_new_task, type_counters, Report, INSTANCES, PROCESSES,
    },
};

/// Runs after the child is fully set up and in its cgroup (`CLONE_INTO_CGROUP` included), before
/// it is first woken: a child stopped here never runs user code.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let child: Task = ctx.arg(1);
    let Ok((child_pid, child_tgid)) = kernel::task_ids(child) else {
        fail_open(FAIL_READ_ERROR, &unplaced(0));
        return 0;
    };
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match classify(parent_tgid, child_tgid) {
        TaskKind::Thread => new_thread(child, child_pid, child_tgid),
        TaskKind::Process => new_process(child, child_pid, child_tgid),
    }
    0
}

fn unplaced(target_pid: u32) -> Report {
    Report {
        cause: CAUSE_FORK,
        type_idx: 0,
        instance: 0,
        target_pid,
    }
}

/// A thread counts where its process is counted; a process without a record is outside every
/// instance, so this is one hash lookup for everyone else.
#[inline(always)]
fn new_thread(child: Task, pid: u32, tgid: u32) {
    let Some(rec) = PROCESSES.get_ptr_mut(&tgid) else {
        return;
    };
    // SAFETY: live map value, plain read.
    let inst = unsafe { (*rec).instance };
    let Some(state) = INSTANCES.get_ptr_mut(&inst) else {
        return;
    };
    // SAFETY: live map value, plain read.
    let type_idx = unsafe { (*state).type_idx };
    let Some(b) = budget(type_idx) else {
        return;
    };
    let c = counters(state);
    let report = Report {
        cause: CAUSE_THREAD,
        type_idx,
        instance: inst,
        target_pid: pid,
    };
    let mut adm = admit(&c, &b, 1, 1, 0, true, now());
    if !adm.counted && needs_doom(true) && !doom(pid) {
        // Without a DOOMED entry the thread's exit would be uncounted: let it in, counted.
        c.tasks.fetch_add(1);
        c.threads.fetch_add(1);
        adm.counted = true;
        adm.refusal = None;
        fail_open(FAIL_DOOMED_FULL, &report);
    }
    if adm.counted {
        process_live(rec).fetch_add(1);
        if let Some(tc) = type_counters(type_idx) {
            tc.threads_allowed += 1;
        }
    }
    record(&adm, &b, state, &report);
    if !adm.counted {
        stop_new_task(child);
    }
}

#[inline(always)]
fn new_process(child: Task, pid: u32, tgid: u32) {
    let placement = match kernel::task_cgroup(child).and_then(crate::state::place) {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(_) => {
            fail_open(FAIL_READ_ERROR, &unplaced(pid));
            return;
        }
    };
    let report = Report {
        cause: CAUSE_FORK,
        type_idx: placement.type_idx,
        instance: placement.instance,
        target_pid: pid,
    };
    let Some(b) = budget(placement.type_idx) else {
        return;
    };
    let Some(state) = instance(placement) else {
        fail_open(FAIL_INSTANCES_FULL, &report);
        return;
    };
    let c = counters(state);
    let adm = admit(&c, &b, 1, 0, 1, true, now());
    if adm.counted {
        let rec = ProcessRecord {
            instance: placement.instance,
            live: 1,
        };
        if PROCESSES.insert(&tgid, &rec, BPF_ANY as u64).is_err() {
            // Uncountable at exit, so not counted now.
            process_left(&c, 1);
            fail_open(FAIL_PROCESSES_FULL, &report);
            return;
        }
        if let Some(tc) = type_counters(placement.type_idx) {
            tc.forks_allowed += 1;
        }
    } else if needs_doom(false) && !doom(pid) {
        fail_open(FAIL_DOOMED_FULL, &report);
        return;
    }
    record(&adm, &b, state, &report);
    if !adm.counted {
        stop_new_task(child);
    }
}
