//! Instance cgroups appearing and going away: an instance's age counts from its mkdir, and its
//! state is dropped with its directory.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    kernel::{self, Cgroup},
    state::{instance, place, INSTANCES},
};

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> i32 {
    let cgrp: Cgroup = ctx.arg(0);
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
    if let Ok(id) = kernel::cgroup_id(cgrp) {
        let _ = INSTANCES.remove(&id);
    }
    0
}
