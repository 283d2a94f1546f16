//! A process moved between cgroups (`cgroup.procs` writes, `docker exec`): its count moves with
//! it. Entering an instance is checked against the budget like a fork; the pids controller
//! never refuses a migration, spawnguard does.

use aya_ebpf::{bindings::BPF_ANY, macros::btf_tracepoint, programs::BtfTracePointContext};
use spawnguard_common::{
    ProcessRecord, CAUSE_MIGRATION, FAIL_DOOMED_FULL, FAIL_INSTANCES_FULL, FAIL_PROCESSES_FULL,
    FAIL_READ_ERROR,
};
use spawnguard_ebpf::{release_tasks, Admission, Refusal, Request};

use crate::{
    kernel::{self, Cgroup, Task},
    state::{
        abandon_probe, admit_task, budget, condemn, condemn_refused_process, counters, doom,
        fail_open, instance, map_full, needs_doom, now, past_max_age, place, record, stop_process,
        type_counters, Report, INSTANCES, PROCESSES,
    },
};

/// Fires after the whole thread group (or one thread, in threaded subtrees) has moved. A process
/// is counted in one instance as a whole.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_task(ctx: BtfTracePointContext) -> i32 {
    let dst: Cgroup = ctx.arg(0);
    let task: Task = ctx.arg(2);
    let mut report = Report {
        cause: CAUSE_MIGRATION,
        type_idx: 0,
        instance: 0,
        target_pid: 0,
    };
    let Ok((pid, tgid)) = kernel::task_ids(task) else {
        fail_open(FAIL_READ_ERROR, &report);
        return 0;
    };
    report.target_pid = pid;
    // Hybrid hosts move tasks in cgroup v1 hierarchies too; only cgroup2 holds instances.
    match kernel::task_cgroup(task) {
        Ok(own) if kernel::same_hierarchy(dst, own) => {}
        _ => return 0,
    }
    let target = match place(dst) {
        Ok(p) => p,
        Err(_) => {
            fail_open(FAIL_READ_ERROR, &report);
            return 0;
        }
    };
    let rec = PROCESSES.get_ptr_mut(&tgid);
    // SAFETY: live map value, plain copy.
    let counted = rec.map(|r| unsafe { *r });
    if counted.map(|r| r.instance) == target.map(|p| p.instance) {
        return 0;
    }
    let live = match counted {
        Some(r) if r.live > 0 => r.live,
        Some(_) => 1,
        None => match kernel::task_live_threads(task) {
            Ok(n) if n > 0 => n as u64,
            // Every thread is exiting: nothing to count, nothing to stop.
            Ok(_) => return 0,
            Err(_) => 1,
        },
    };
    if let Some(r) = counted {
        if let Some(state) = INSTANCES.get_ptr_mut(&r.instance) {
            // SAFETY: live map value, plain read.
            let type_idx = unsafe { (*state).type_idx };
            // Leaving is not ending: a process moved out is no start-up failure for the
            // breaker, so the instance's end is not reported to it.
            // (An instance left empty keeps its entry until a task enters it again or its
            // directory goes: reclaiming it here would cost this program's verification more
            // than the entry costs.)
            if let Some(c) = counters(state, type_idx) {
                release_tasks(&c, live, live - 1, 1);
            }
        }
        let _ = PROCESSES.remove(&tgid);
    }
    let Some(mut p) = target else {
        return 0;
    };
    report.instance = p.instance;
    let state = instance(&mut p);
    report.type_idx = p.type_idx;
    let Some(state) = state else {
        fail_open(FAIL_INSTANCES_FULL, &report);
        return 0;
    };
    let Some(b) = budget(p.type_idx) else {
        return 0;
    };
    let Some(c) = counters(state, p.type_idx) else {
        return 0;
    };
    let request = Request {
        tasks: live,
        threads: live - 1,
        processes: 1,
        rate: false,
        now: now(),
    };
    let adm = if past_max_age(state, p.type_idx, &report) {
        Admission::refused(Refusal::MaxAge)
    } else {
        admit_task(&c, &b, &request, state, &report)
    };
    if adm.counted {
        let rec = ProcessRecord {
            instance: p.instance,
            live,
        };
        if PROCESSES.insert(&tgid, &rec, BPF_ANY as u64).is_err() {
            // It opened the instance: a new instance runs uncounted (as when the instance map
            // is full). An instance already counted stays held: the process is refused as a
            // move past the budget is (an agent that fills the map must not lift its own
            // budget).
            let opened = release_tasks(&c, live, live - 1, 1).closed;
            if opened {
                abandon_probe(&report);
            }
            let stopped = !opened
                && condemn_refused_process(task, pid, tgid, p.instance)
                && stop_process(task);
            map_full(FAIL_PROCESSES_FULL, stopped, &report);
            return 0;
        }
        if let Some(tc) = type_counters(p.type_idx) {
            tc.migrations_in += 1;
        }
    } else if !adm.contended && needs_doom(false) && !doom(task, pid, tgid, p.instance) {
        // DOOMED is full. A process needs no mark there (its record is gone, so its exit gives
        // back nothing): condemned, it is stopped all the same.
        let condemned = condemn(task, tgid, p.instance);
        map_full(FAIL_DOOMED_FULL, condemned, &report);
        if !condemned {
            return 0;
        }
    }
    record(&adm, &b, &c, &report);
    if !adm.counted && !adm.contended && !stop_process(task) {
        fail_open(spawnguard_common::FAIL_KILL, &report);
    }
    0
}
