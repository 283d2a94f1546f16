//! kill-compat backend (and lsm without the kfunc): kills condemned processes on their way back
//! to user space. Attached only then, since it runs on every syscall of every task. Keyed by
//! process: a process moved into an instance over budget dies when any of its threads returns
//! from a system call, whichever thread was moved.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_send_signal},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::state::CONDEMNED;

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only the presence of the value is used.
    if unsafe { CONDEMNED.get(&tgid) }.is_some() {
        // SAFETY: helper acting on the current task's process only.
        unsafe {
            bpf_send_signal(9);
        }
    }
    0
}
