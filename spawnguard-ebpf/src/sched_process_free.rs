//! A task released (its parent reaped it, or a thread that reaped itself), an RCU grace period
//! after `release_task`: what it held since its exit is given back. The pids controller gives
//! back its PID at `release_task`; this comes that grace period (milliseconds) later. Runs in
//! an RCU callback: `current` is not the task.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use spawnguard_common::{RELEASE_PROCESS, RELEASE_REFUSED};
use spawnguard_ebpf::AtomicU64;

use crate::{
    kernel::{self, Task},
    state::{
        global_counters, process_live, release_counted, take_one, INSTANCES, PROCESSES, RELEASING,
    },
};

#[btf_tracepoint(function = "sched_process_free")]
pub fn sched_process_free(ctx: BtfTracePointContext) -> i32 {
    let task: Task = ctx.arg(0);
    let key = task as u64;
    let (pid, tgid) = kernel::task_ids(task).unwrap_or((0, 1));
    if pid == tgid {
        // The leader is released after every other thread of its process: the process's
        // record goes now, unless its pid already names a new process with live tasks.
        if let Some(rec) = PROCESSES.get_ptr_mut(&tgid) {
            if process_live(rec).load() == 0 {
                let _ = PROCESSES.remove(&tgid);
            }
        }
    }
    // SAFETY: plain data copied out at once.
    let Some(r) = (unsafe { RELEASING.get(&key) }).copied() else {
        return 0;
    };
    let _ = RELEASING.remove(&key);
    let Some(state) = INSTANCES.get_ptr_mut(&r.instance) else {
        // Its instance's entry went with a count that drifted (settled at rmdir).
        if r.kind != RELEASE_REFUSED {
            if let Some(g) = global_counters() {
                g.drift += 1;
            }
        }
        return 0;
    };
    if r.kind == RELEASE_REFUSED {
        // SAFETY: an aligned u64 of a live map value, only updated atomically.
        take_one(unsafe { AtomicU64::from_ptr(&raw mut (*state).refused_unreaped) });
        return 0;
    }
    // SAFETY: as above.
    take_one(unsafe { AtomicU64::from_ptr(&raw mut (*state).releasing) });
    let (threads, processes) = if r.kind == RELEASE_PROCESS {
        (0, 1)
    } else {
        (1, 0)
    };
    release_counted(
        state, r.type_idx, r.instance, pid, threads, processes, false,
    );
    0
}
