//! lsm backend only: a fork that `task_alloc` admitted but that failed later in `copy_process`
//! (a full `pids.max`, no memory) never reaches the fork tracepoint; its task is freed here and
//! its charge given back. For every other freed task this is one missed hash lookup.

use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::state::{release_pending, PENDING};

#[lsm(hook = "task_free")]
pub fn task_free(ctx: LsmContext) -> i32 {
    let task: u64 = ctx.arg(0);
    // SAFETY: the value is copied out at once.
    let Some(p) = (unsafe { PENDING.get(&task) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(&task);
    release_pending(&p);
    0
}
