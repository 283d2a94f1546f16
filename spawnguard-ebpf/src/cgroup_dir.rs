//! Instance cgroups appearing and going away: an instance's age counts from its mkdir, and its
//! state is dropped with its directory.

use aya_ebpf::{
    helpers::bpf_get_current_task, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use crate::{
    kernel::{self, Cgroup},
    state::{instance, place, INSTANCES},
};

/// Whether `cgrp` is on the cgroup2 hierarchy (the current task's own cgroup there is the
/// reference). mkdir and rmdir in cgroup v1 hierarchies, where ids overlap with cgroup2's,
/// are ignored.
#[inline(always)]
fn on_cgroup2(cgrp: Cgroup) -> bool {
    // SAFETY: the helper returns the current task, valid for this program run.
    let current = unsafe { bpf_get_current_task() } as *const u8;
    kernel::task_cgroup(current).is_ok_and(|own| kernel::same_hierarchy(cgrp, own))
}

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> i32 {
    let cgrp: Cgroup = ctx.arg(0);
    if !on_cgroup2(cgrp) {
        return 0;
    }
    if let (Ok(Some(p)), Ok(id)) = (place(cgrp), kernel::cgroup_id(cgrp)) {
        if p.instance == id {
            let _ = instance(p);
        }
    }
    0
}

/// rmdir only succeeds on an empty cgroup, so every task of the instance has already exited.
#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: BtfTracePointContext) -> i32 {
    let cgrp: Cgroup = ctx.arg(0);
    if !on_cgroup2(cgrp) {
        return 0;
    }
    if let Ok(id) = kernel::cgroup_id(cgrp) {
        let _ = INSTANCES.remove(&id);
    }
    0
}
