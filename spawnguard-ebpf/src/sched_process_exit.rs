//! Every exiting task: uncount it where it was counted. A process stops counting when its last
//! live task exits, whichever thread that is.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use spawnguard_ebpf::release_tasks;

use spawnguard_common::CAUSE_EXIT;

use crate::kernel;
use crate::state::{
    counters, global_counters, instance_ended, process_live, Report, DOOMED, INSTANCES, PROCESSES,
};

/// Fires in `do_exit` of the exiting task itself, before it leaves its cgroup.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    let (pid, tgid) = (id as u32, (id >> 32) as u32);
    if DOOMED.remove(&pid).is_ok() {
        // A denied task: never counted.
        return 0;
    }
    let Some(rec) = PROCESSES.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: the helper returns the current task, valid for this program run.
    let current = unsafe { bpf_get_current_task() } as *const u8;
    if kernel::is_kernel_created_worker(current) {
        return 0;
    }
    // SAFETY: live map value, plain read.
    let inst = unsafe { (*rec).instance };
    let last = process_live(rec).fetch_sub_exact(1) <= 1;
    if let Some(state) = INSTANCES.get_ptr_mut(&inst) {
        // SAFETY: live map value, plain read.
        let type_idx = unsafe { (*state).type_idx };
        if let Some(c) = counters(state, type_idx) {
            let (threads, processes) = if last { (0, 1) } else { (1, 0) };
            let left = release_tasks(&c, 1, threads, processes);
            if left.drift {
                if let Some(g) = global_counters() {
                    g.drift += 1;
                }
            }
            if left.closed {
                let r = Report {
                    cause: CAUSE_EXIT,
                    type_idx,
                    instance: inst,
                    target_pid: pid,
                };
                instance_ended(state, &r);
            }
        }
    }
    if last {
        let _ = PROCESSES.remove(&tgid);
    }
    0
}
