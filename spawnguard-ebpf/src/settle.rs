//! Not attached to anything: the daemon runs it (`BPF_PROG_TEST_RUN`) on what its sweep found
//! left behind at two sweeps in a row:
//! - instance entries with no task: the hooks give an entry back when its last task leaves;
//!   this settles the ones they could not (a close that missed the emulated-atomics lock on
//!   kernels before 5.12, where a lock holder's vCPU may be descheduled; an instance whose first
//!   task was refused; one emptied by moving out);
//! - charges of exited tasks that are gone (reaped) but were never given back by the free hook
//!   (seen on a loaded host: a few in some hundreds, cause not found);
//! - records of processes that are gone, with no live task, that the free hook never removed
//!   (seen after daemon kills during an install: they hold no count, but fill the process map).

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use spawnguard_common::{SETTLE_DONE, SETTLE_PROCESS, SETTLE_RELEASE};

use crate::state;

/// Arguments: what to do (`SETTLE_INSTANCE`, `SETTLE_RELEASE`, `SETTLE_PROCESS`), its key (an
/// instance id, a parked task's address, a tgid) and, for a charge, the start time of the task
/// it was parked for.
#[raw_tracepoint(tracepoint = "spawnguard_settle")]
pub fn settle(ctx: RawTracePointContext) -> i32 {
    let what: u64 = ctx.arg(0);
    let key: u64 = ctx.arg(1);
    if what == SETTLE_PROCESS {
        return state::settle_process(key as u32) as i32;
    }
    if what != SETTLE_RELEASE {
        return state::settle(key) as i32;
    }
    let start_ns: u64 = ctx.arg(2);
    let code = state::release_parked(key, 0, start_ns);
    if code == SETTLE_DONE {
        if let Some(g) = state::global_counters() {
            g.released_late += 1;
        }
    }
    code as i32
}
