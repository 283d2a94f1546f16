//! Every new task: count it in its instance, or deny it when a budget does not hold.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use spawnguard_common::{
    PendingTask, ProcessRecord, BACKEND_LSM, CAUSE_FORK, CAUSE_THREAD, FAIL_CONTENDED,
    FAIL_DOOMED_FULL, FAIL_INSTANCES_FULL, FAIL_PROCESSES_FULL, FAIL_READ_ERROR, PENDING_COUNTED,
    PENDING_THREAD,
};
use spawnguard_ebpf::{charge_tasks, classify, release_tasks, TaskKind};

use crate::{
    kernel::{self, Task},
    state::{
        abandon_probe, admit_process, admit_thread, admit_thread_anyway, backend, budget, condemn,
        condemn_refused_process, counters, doom, fail_open, hold_refused, instance, map_full,
        mark_uncounted, needs_doom, place, process_live, record, release_pending, stop_new_task,
        stop_with_kfunc, type_counters, Report, CONDEMNED, DOOMED, INSTANCES, PENDING, PROCESSES,
    },
};

/// Runs after the child is fully set up and in its cgroup (`CLONE_INTO_CGROUP` included), before
/// it is first woken: a child stopped here never runs user code.
#[btf_tracepoint(function = "sched_process_fork")]
// Inlined into the program's entry point, which otherwise is a frame of its own (kernels before
// 6.x count 32 bytes for it in the 512 the program and its subprograms share).
#[inline(always)]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let child: Task = ctx.arg(1);
    // lsm backend: what task_alloc charged for this task (taken first, so that no path below
    // can leave it to be released a second time by task_free).
    let mut pending = None;
    if backend() == BACKEND_LSM {
        let key = child as u64;
        // SAFETY: the value is copied out at once.
        pending = unsafe { PENDING.get(&key) }.copied();
        if pending.is_some() {
            let _ = PENDING.remove(&key);
        }
    }
    // Plain loads: `child` is typed by the tracepoint's BTF (#18: the cheapest path for the
    // tasks outside every instance, which are most of a host's).
    let (child_pid, child_tgid) = kernel::btf_task_ids(child);
    // Ids are reused: whatever a previous owner of this pid left in DOOMED must not apply to
    // the new task (it would be killed, or its exit skipped). Looked up before it is deleted:
    // a delete takes the bucket's lock even when the key is missing, a lookup takes none, and
    // almost every fork has nothing to clean up (#18). Nothing else writes these keys while
    // the child has not run yet.
    if DOOMED.get_ptr(&child_pid).is_some() {
        let _ = DOOMED.remove(&child_pid);
    }
    if child_pid == child_tgid {
        if CONDEMNED.get_ptr(&child_tgid).is_some() {
            let _ = CONDEMNED.remove(&child_tgid);
        }
        // A new process: a record its pid's previous owner left (released, not yet freed)
        // must not make its exit release what it never held.
        if PROCESSES.get_ptr(&child_tgid).is_some() {
            let _ = PROCESSES.remove(&child_tgid);
        }
    }
    if let Some(p) = pending {
        if settle_pending(&p, child, child_pid, child_tgid) {
            return 0;
        }
        // The spawner moved to another instance while it forked: given back, decided below.
        release_pending(&p);
    }
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match classify(parent_tgid, child_tgid) {
        TaskKind::Thread => new_thread(child, child_pid, child_tgid),
        TaskKind::Process => new_process(child, child_pid, child_tgid),
    }
    0
}

#[inline(always)]
fn report(cause: u32, type_idx: u32, instance: u64, target_pid: u32) -> Report {
    Report {
        cause,
        type_idx,
        instance,
        target_pid,
    }
}

/// lsm backend: `task_alloc` decided this task; record it where it was charged. Returns false,
/// with nothing done, when the task is not where it was charged: its spawner was moved to
/// another cgroup between `task_alloc` and the move into place (a migration takes the
/// threadgroup lock a fork waits for).
#[inline(always)]
fn settle_pending(p: &PendingTask, child: Task, pid: u32, tgid: u32) -> bool {
    let counted = p.flags & PENDING_COUNTED != 0;
    if p.flags & PENDING_THREAD != 0 {
        if !counted {
            mark_uncounted(pid);
            return true;
        }
        match PROCESSES.get_ptr_mut(&tgid) {
            // SAFETY: live map value, plain read.
            Some(rec) if unsafe { (*rec).instance } == p.instance => {
                process_live(rec).fetch_add(1);
                if let Some(tc) = type_counters(p.type_idx) {
                    tc.threads_allowed += 1;
                }
                true
            }
            // Its process ended meanwhile (nothing will uncount the thread), or moved.
            _ => false,
        }
    } else {
        if !counted {
            // Not counted (an earlier record of its tgid went at the top).
            return true;
        }
        match place(kernel::btf_task_cgroup(child)) {
            Ok(Some(here)) if here.instance == p.instance => {}
            _ => return false,
        }
        let rec = ProcessRecord {
            instance: p.instance,
            live: 1,
        };
        if PROCESSES.insert(&tgid, &rec, BPF_ANY as u64).is_err() {
            // Uncountable at exit, so not counted now.
            // It opened its instance: a new instance runs uncounted (as when the instance map
            // is full). In an instance already counted it is refused.
            let opened = release_pending(p);
            let stopped = !opened && stop_unrecorded(child, pid, tgid, p.instance);
            if stopped {
                if let Some(state) = INSTANCES.get_ptr_mut(&p.instance) {
                    hold_refused(
                        child,
                        state,
                        &report(CAUSE_FORK, p.type_idx, p.instance, pid),
                    );
                }
            }
            map_full(
                FAIL_PROCESSES_FULL,
                stopped,
                &report(CAUSE_FORK, p.type_idx, p.instance, pid),
            );
            return true;
        }
        if let Some(tc) = type_counters(p.type_idx) {
            tc.forks_allowed += 1;
        }
        true
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
    let (Some(b), Some(c)) = (budget(type_idx), counters(state, type_idx)) else {
        return;
    };
    let r = report(CAUSE_THREAD, type_idx, inst, pid);
    let mut adm = admit_thread(&c, &b, state, &r);
    // The thread's process is counted, so its exit will be uncounted unless DOOMED says
    // otherwise: a thread that is neither counted nor doomed would make the counts drift.
    let mut why = FAIL_CONTENDED;
    if !adm.counted && !adm.contended && !doom(child, pid, tgid, inst) {
        // Refused, and DOOMED (or CONDEMNED) is full. Stopped all the same, ending its process
        // as any refused thread does with the kill backends (an agent that fills the map must
        // not lift its own budget): counted with no check for the instant that takes, so its
        // exit gives back only what it holds.
        if stop_with_kfunc() || condemn(child, tgid, inst) {
            // (`doom` makes a mark before it finds CONDEMNED full.)
            if DOOMED.get_ptr(&pid).is_some() {
                let _ = DOOMED.remove(&pid);
            }
            charge_tasks(&c, 1, 1, 0);
            process_live(rec).fetch_add(1);
            map_full(FAIL_DOOMED_FULL, true, &r);
        } else {
            why = FAIL_DOOMED_FULL;
            adm.contended = true;
        }
    }
    // Contended, or refused where it cannot be stopped: fail open, count it after all, or
    // mark it uncounted.
    if adm.contended {
        fail_open(why, &r);
        adm = admit_thread_anyway(&c, &b, state, &r);
        if !adm.counted {
            mark_uncounted(pid);
            return;
        }
    }
    if adm.counted {
        process_live(rec).fetch_add(1);
        if let Some(tc) = type_counters(type_idx) {
            tc.threads_allowed += 1;
        }
    }
    record(&adm, &b, &c, &r);
    if !adm.counted && !stop_new_task(child) {
        fail_open(spawnguard_common::FAIL_KILL, &r);
    }
}

#[inline(always)]
fn new_process(child: Task, pid: u32, tgid: u32) {
    let mut placement = match place(kernel::btf_task_cgroup(child)) {
        Ok(Some(p)) => p,
        // Outside every instance: not counted (an earlier record of its tgid went at the top).
        Ok(None) => return,
        Err(_) => {
            fail_open(FAIL_READ_ERROR, &report(CAUSE_FORK, 0, 0, pid));
            return;
        }
    };
    let Some(state) = instance(&mut placement) else {
        fail_open(
            FAIL_INSTANCES_FULL,
            &report(CAUSE_FORK, placement.type_idx, placement.instance, pid),
        );
        return;
    };
    let r = report(CAUSE_FORK, placement.type_idx, placement.instance, pid);
    let Some(b) = budget(placement.type_idx) else {
        return;
    };
    let Some(c) = counters(state, placement.type_idx) else {
        return;
    };
    let adm = admit_process(&c, &b, state, &r);
    if adm.counted {
        let rec = ProcessRecord {
            instance: placement.instance,
            live: 1,
        };
        if PROCESSES.insert(&tgid, &rec, BPF_ANY as u64).is_err() {
            // Uncountable at exit, so not counted now. It opened its instance: a new instance
            // runs uncounted (as when the instance map is full). In an instance already
            // counted it is refused.
            let opened = release_tasks(&c, 1, 0, 1).closed;
            if opened {
                abandon_probe(&r);
            }
            let stopped = !opened && stop_unrecorded(child, pid, tgid, placement.instance);
            if stopped {
                hold_refused(child, state, &r);
            }
            map_full(FAIL_PROCESSES_FULL, stopped, &r);
            return;
        }
        if let Some(tc) = type_counters(placement.type_idx) {
            tc.forks_allowed += 1;
        }
    } else if !adm.contended && needs_doom(false) && !doom(child, pid, tgid, placement.instance) {
        // DOOMED is full. A process needs no mark there (it has no record, so its exit gives
        // back nothing): condemned, it is stopped all the same.
        let condemned = condemn(child, tgid, placement.instance);
        map_full(FAIL_DOOMED_FULL, condemned, &r);
        if !condemned {
            return;
        }
    }
    record(&adm, &b, &c, &r);
    if !adm.counted && !adm.contended {
        if stop_new_task(child) {
            hold_refused(child, state, &r);
        } else {
            fail_open(spawnguard_common::FAIL_KILL, &r);
        }
    }
}

/// Stops a new process in an instance already counted that the full process map cannot record
/// (an agent that fills the map must not lift its own budget), as a refused process is stopped.
/// False when it cannot be: it then runs, uncounted.
#[inline(always)]
fn stop_unrecorded(child: Task, pid: u32, tgid: u32, instance: u64) -> bool {
    condemn_refused_process(child, pid, tgid, instance) && stop_new_task(child)
}
