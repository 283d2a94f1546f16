//! A task released (its parent reaped it, or a thread that reaped itself), an RCU grace period
//! after `release_task`: what it held since its exit is given back. The pids controller gives
//! back its PID at `release_task`; this comes that grace period (milliseconds) later. Runs in
//! an RCU callback: `current` is not the task.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    kernel::{self, Task},
    state::{process_live, release_parked, PROCESSES},
};

#[btf_tracepoint(function = "sched_process_free")]
pub fn sched_process_free(ctx: BtfTracePointContext) -> i32 {
    let task: Task = ctx.arg(0);
    let key = task as u64;
    // Plain loads (`task` is typed by the tracepoint's BTF): this runs for every task.
    let (pid, tgid) = kernel::btf_task_ids(task);
    if pid == tgid {
        // The leader is released after every other thread of its process: the process's
        // record goes now, unless its pid already names a new process with live tasks.
        if let Some(rec) = PROCESSES.get_ptr_mut(&tgid) {
            if process_live(rec).load() == 0 {
                let _ = PROCESSES.remove(&tgid);
            }
        }
    }
    release_parked(key, pid, 0);
    0
}
