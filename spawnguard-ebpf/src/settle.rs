//! Not attached to anything: the daemon runs it (`BPF_PROG_TEST_RUN`) on instance entries it
//! found empty at two sweeps in a row, with the instance id as the first argument. The hooks
//! give an entry back when its last task leaves; this settles the ones they could not: a close
//! that missed the emulated-atomics lock (kernels before 5.12, where a lock holder's vCPU may be
//! descheduled), an instance whose first task was refused, one emptied by moving out.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::state;

#[raw_tracepoint(tracepoint = "spawnguard_settle")]
pub fn settle(ctx: RawTracePointContext) -> i32 {
    let id: u64 = ctx.arg(0);
    state::settle(id) as i32
}
