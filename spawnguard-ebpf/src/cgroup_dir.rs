//! Cgroups appearing and going away. A directory created at a type's path is that type from
//! its mkdir on (types follow their path, not a directory's id: systemd and cleanup scripts
//! remove empty directories and create them again). An instance's age counts from its mkdir,
//! and what is kept of it is dropped with its directory.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_get_current_task, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use spawnguard_common::{PathKey, TypeDir, CAUSE_MIGRATION, NO_TYPE, PATH_NAME_LEN};
use spawnguard_ebpf::{release_tasks, word_tasks, ADMITTED};

use crate::{
    kernel::{self, Cgroup},
    state::{
        counters, global_counters, keep_created, now, place, Report, CREATED, INSTANCES,
        PATH_CHILDREN, PATH_DIRS, TYPE_DIRS,
    },
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
    follow_type_paths(cgrp, id);
    let Ok(Some(p)) = place(cgrp) else {
        return 0;
    };
    if p.instance == id {
        let r = Report {
            cause: CAUSE_MIGRATION,
            type_idx: p.type_idx,
            instance: id,
            target_pid: 0,
        };
        keep_created(id, now(), &r);
    }
    0
}

/// Runs before the new directory is visible (`kernfs_activate` comes after the tracepoint), so
/// no task can be in it before it is known: when it is created at a path node, it stands there,
/// and when that node is a type directory, the type's instances are placed under it at once.
#[inline(always)]
fn follow_type_paths(cgrp: Cgroup, id: u64) {
    let Ok(level) = kernel::cgroup_level(cgrp) else {
        return;
    };
    if level == 0 {
        return;
    }
    let Ok(parent) = kernel::cgroup_ancestor_id(cgrp, level - 1) else {
        return;
    };
    // SAFETY: plain data copied out at once.
    let Some(parent_node) = (unsafe { PATH_DIRS.get(&parent) }).map(|n| n.node) else {
        return;
    };
    let mut key = PathKey {
        parent: parent_node,
        _pad: 0,
        name: [0; PATH_NAME_LEN],
    };
    if !kernel::cgroup_name_into(cgrp, &mut key.name) {
        return;
    }
    // SAFETY: plain data copied out at once.
    let Some(node) = (unsafe { PATH_CHILDREN.get(&key) }).copied() else {
        return;
    };
    let _ = PATH_DIRS.insert(&id, &node, BPF_ANY as u64);
    if node.type_idx != NO_TYPE {
        let dir = TypeDir {
            type_idx: node.type_idx,
            level,
        };
        let _ = TYPE_DIRS.insert(&id, &dir, BPF_ANY as u64);
    }
}

/// rmdir only succeeds on a cgroup with no live task, but its tasks that exited may not be
/// released yet (zombies not reaped): they keep the entry, and the last one's release gives it
/// back. With none pending, the counts are zero; if they are not (drift), they are settled here,
/// so the type and host totals and the instance's slot are not held forever. (An entry left
/// behind anyway is settled by the daemon's sweep, `settle.rs`.)
#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: BtfTracePointContext) -> i32 {
    let cgrp: Cgroup = ctx.arg(0);
    if !on_cgroup2(cgrp) {
        return 0;
    }
    let Ok(id) = kernel::cgroup_id(cgrp) else {
        return 0;
    };
    let _ = CREATED.remove(&id);
    if PATH_DIRS.remove(&id).is_ok() {
        let _ = TYPE_DIRS.remove(&id);
    }
    let Some(state) = INSTANCES.get_ptr_mut(&id) else {
        return 0;
    };
    // SAFETY: live map value, plain reads.
    let (type_idx, word, threads, processes, releasing) = unsafe {
        (
            (*state).type_idx,
            (*state).tasks,
            (*state).threads,
            (*state).processes,
            (*state).releasing,
        )
    };
    let tasks = word_tasks(word);
    if releasing != 0 && tasks != 0 {
        // Exited tasks wait to be reaped: the last one's release closes and reclaims it, and
        // must not keep a creation time for this directory (CREATED would leak one entry per
        // such removal: the churn drill saw 500 in 5,000). No task can start in a removed
        // directory, so nothing else writes the flags now (plain read-modify-write). Removing
        // CREATED again closes the window where a release on another CPU read the flags first.
        // SAFETY: live map value.
        unsafe { (*state).flags |= spawnguard_common::INSTANCE_REMOVED };
        let _ = CREATED.remove(&id);
        return 0;
    }
    if let Some(c) = counters(state, type_idx) {
        if tasks != 0 {
            if let Some(g) = global_counters() {
                g.drift += 1;
            }
        }
        if word != 0 {
            let left = release_tasks(&c, tasks, threads, processes);
            if word & ADMITTED != 0 && !left.closed {
                // Its close missed the emulated lock: removing the entry now would keep its
                // `max_instances` slot forever. The daemon's sweep settles it (no task can
                // enter a removed directory).
                return 0;
            }
        }
    }
    let _ = INSTANCES.remove(&id);
    0
}
