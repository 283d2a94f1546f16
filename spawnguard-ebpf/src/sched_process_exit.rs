//! Every exiting task: its charge is kept until it is released (see `sched_process_free`), as
//! the pids controller keeps it: an unreaped zombie holds a PID. The exit of a process's last
//! live task (whichever thread that is) is the process's own; its record goes when its leader is
//! released.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use spawnguard_common::{ReleasingTask, CAUSE_EXIT, RELEASE_PROCESS, RELEASE_THREAD};

use crate::{
    kernel::{self, Task},
    state::{
        all_exited, defer_release, global_counters, instance_ended, process_live, release_counted,
        Report, CONDEMNED, DOOMED, INSTANCES, PROCESSES,
    },
};

/// Fires in `do_exit` of the exiting task itself, before it leaves its cgroup.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    let (pid, tgid) = (id as u32, (id >> 32) as u32);
    // SAFETY: the helper returns the current task, valid for this program run.
    let current = unsafe { bpf_get_current_task() } as Task;
    // SAFETY: only the presence of the value is used.
    if unsafe { CONDEMNED.get(&tgid) }.is_some() && kernel::is_group_dead(current) {
        let _ = CONDEMNED.remove(&tgid);
    }
    // Looked up before it is deleted: a delete takes the bucket's lock even for a missing key,
    // and almost no exiting task was doomed (#18).
    if DOOMED.get_ptr(&pid).is_some() && DOOMED.remove(&pid).is_ok() {
        // A denied task, or one let through uncounted: never counted.
        return 0;
    }
    let Some(rec) = PROCESSES.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: live map value, plain read.
    let inst = unsafe { (*rec).instance };
    let last = process_live(rec).fetch_sub_exact(1) <= 1;
    if let Some(state) = INSTANCES.get_ptr_mut(&inst) {
        // SAFETY: live map value, plain read.
        let type_idx = unsafe { (*state).type_idx };
        let pending = ReleasingTask {
            instance: inst,
            type_idx,
            kind: if last {
                RELEASE_PROCESS
            } else {
                RELEASE_THREAD
            },
            // (The task's id and start are read where it is parked.)
            ..ReleasingTask::default()
        };
        if defer_release(current, state, &pending) {
            // Its last live task exited: the instance ended (a start-up failure, or the
            // probe's end, for the breaker), though its zombies hold it until reaped.
            if all_exited(state) {
                let r = Report {
                    cause: CAUSE_EXIT,
                    type_idx,
                    instance: inst,
                    target_pid: pid,
                };
                instance_ended(state, &r);
            }
        } else {
            // RELEASING is full: given back now, as if reaped at once.
            if let Some(g) = global_counters() {
                g.releasing_full += 1;
            }
            let (threads, processes) = if last { (0, 1) } else { (1, 0) };
            release_counted(state, type_idx, inst, pid, threads, processes, true);
        }
    }
    // The record stays until the leader is released (`sched_process_free`): a sibling exiting
    // at the same moment still finds it. (Which exit is the last is exact with the atomic
    // build, but only estimated where the emulated build misses its lock; removing the record
    // on an estimate lost the charges of the siblings that came after.)
    0
}
