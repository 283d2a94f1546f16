//! Instance cgroups appearing and going away: an instance's age counts from its mkdir, and its
//! state is dropped with its directory.

use aya_ebpf::{
    helpers::bpf_get_current_task, macros::btf_tracepoint, programs::BtfTracePointContext,
};

use spawnguard_ebpf::{release_tasks, word_tasks};

use crate::{
    kernel::{self, Cgroup},
    state::{counters, global_counters, instance, place, INSTANCES},
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
    // One step at a time: evaluated together, LLVM loaded the placement's fields before
    // knowing there was one, a read of uninitialized stack that kernels before 6.5 refuse.
    let Ok(id) = kernel::cgroup_id(cgrp) else {
        return 0;
    };
    let Ok(Some(p)) = place(cgrp) else {
        return 0;
    };
    if p.instance == id {
        let _ = instance(p);
    }
    0
}

/// rmdir only succeeds on an empty cgroup, so every task of the instance has already exited
/// and its counts are zero. If they are not (drift), they are settled here, so the type and
/// host totals and the instance's slot are not held forever.
#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: BtfTracePointContext) -> i32 {
    let cgrp: Cgroup = ctx.arg(0);
    if !on_cgroup2(cgrp) {
        return 0;
    }
    let Ok(id) = kernel::cgroup_id(cgrp) else {
        return 0;
    };
    if let Some(state) = INSTANCES.get_ptr_mut(&id) {
        // SAFETY: live map value, plain reads.
        let (type_idx, word, threads, processes) = unsafe {
            (
                (*state).type_idx,
                (*state).tasks,
                (*state).threads,
                (*state).processes,
            )
        };
        if let Some(c) = counters(state, type_idx) {
            let tasks = word_tasks(word);
            if tasks != 0 {
                if let Some(g) = global_counters() {
                    g.drift += 1;
                }
            }
            if word != 0 {
                release_tasks(&c, tasks, threads, processes);
            }
        }
    }
    let _ = INSTANCES.remove(&id);
    0
}
