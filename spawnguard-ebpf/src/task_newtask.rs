//! io_uring and vhost workers: made by `copy_process` like any task, so the pids controller
//! counts them, but they never pass the fork tracepoint. Counted here as threads of their
//! process, never refused: under the kill backends a signal to a worker kills its process, and
//! the kernel, not the agent, decides when they are made (an io_uring SQPOLL thread at setup).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use spawnguard_common::CAUSE_THREAD;

use crate::{
    kernel::{self, Task},
    state::{
        admit_thread_anyway, budget, counters, mark_uncounted, process_live, record, type_counters,
        Report, INSTANCES, PROCESSES,
    },
};

/// Fires at the end of `copy_process` for every new task; one flag read for all but workers.
#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> i32 {
    let task: Task = ctx.arg(0);
    if !kernel::is_kernel_created_worker(task) {
        return 0;
    }
    let Ok((pid, tgid)) = kernel::task_ids(task) else {
        return 0;
    };
    let Some(rec) = PROCESSES.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: live map value, plain read.
    let inst = unsafe { (*rec).instance };
    let Some(state) = INSTANCES.get_ptr_mut(&inst) else {
        mark_uncounted(pid);
        return 0;
    };
    // SAFETY: live map value, plain read.
    let type_idx = unsafe { (*state).type_idx };
    let (Some(b), Some(c)) = (budget(type_idx), counters(state, type_idx)) else {
        mark_uncounted(pid);
        return 0;
    };
    let r = Report {
        cause: CAUSE_THREAD,
        type_idx,
        instance: inst,
        target_pid: pid,
    };
    let adm = admit_thread_anyway(&c, &b, state, &r);
    if adm.counted {
        process_live(rec).fetch_add(1);
        if let Some(tc) = type_counters(type_idx) {
            tc.threads_allowed += 1;
        }
    } else {
        // Contended: its exit must not be uncounted either.
        mark_uncounted(pid);
    }
    record(&adm, &b, &c, &r);
    0
}
