//! kill-compat backend only: kills doomed tasks on their way back to user space. Attached only
//! when that backend is selected, since it runs on every syscall of every task.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_send_signal},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::state::{DOOMED, DOOM_KILL};

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(_ctx: RawTracePointContext) -> i32 {
    let pid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a u32 map value copied out at once.
    if unsafe { DOOMED.get(&pid) }.is_some_and(|v| *v == DOOM_KILL) {
        // SAFETY: helper acting on the current task only.
        unsafe {
            bpf_send_signal(9);
        }
    }
    0
}
