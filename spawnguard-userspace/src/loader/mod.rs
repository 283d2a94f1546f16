//! Loading the embedded eBPF object into the running kernel: offsets from BTF, kfunc ids, backend
//! choice, policy into maps, attaching every hook, pinning the maps for `status`.
//!
//! One file per concern:
//!
//! - `object.rs`: the embedded eBPF objects, and whether this kernel needs the one that
//!   emulates the atomic instructions.
//! - `backend.rs`: the backend asked for and the one chosen, and the lsm probe.
//! - `pins.rs`: where the enforcer is pinned, opening its maps, other layouts, the state file.
//! - `install.rs`: the `Enforcer`, installed or adopted; the checks before.
//! - `attach.rs`: every program in one table (`HOOKS`), loaded, attached and pinned in order.
//! - `policy_maps.rs`: the policy written into the maps, and the type slots.
//! - `type_paths.rs`: the type paths the kernel follows.
//! - `reconcile.rs`: counting the agents that already run.
//! - `uninstall.rs`: removing every pinned enforcer and waiting for the kernel to let go.
//! - `verifier.rs`: each program's verifier steps, loaded as `install` loads it, not attached.

mod attach;
mod backend;
mod install;
mod object;
mod pins;
mod policy_maps;
mod reconcile;
mod type_paths;
mod uninstall;
mod verifier;

pub use attach::SETTLE_PROGRAM;
pub use backend::{probe_lsm, probe_lsm_reason, Backend, BackendChoice, KILL_KFUNC};
pub use install::{preflight, Enforcer, MapCapacity};
pub use object::{emulated_atomics, EMULATED_ATOMICS_ENV};
pub use pins::{
    installed_policy_side, open_installed, open_pinned, other_layouts, pin_dir, policy_side,
    DaemonState, PIN_ROOT, RUN_DIR, STATE_FILE,
};
pub use policy_maps::{breaker_limits, host_limits, name_of, place_types, type_limits, PlacedType};
pub use uninstall::uninstall;
pub use verifier::{
    verifier_steps, ProgramSteps, StepsError, StepsFrom, VerifierSteps, VERIFIED_INSNS_KERNEL,
    VERIFIER_LIMIT,
};

use pins::check_no_other_layout;

/// The policy's types placed under `mount`, in slots from 7 on, for unit tests.
#[cfg(test)]
fn placed(policy: &crate::policy::Policy, mount: &str) -> Vec<PlacedType> {
    use crate::{
        cgroupfs::Cgroup2,
        policy::{Mode, OnMaxAge},
    };

    let cg = Cgroup2 {
        mount: mount.into(),
        root: "/".into(),
    };
    policy
        .types
        .iter()
        .enumerate()
        .map(|(i, t)| PlacedType {
            name: t.name.clone(),
            index: i as u32 + 7,
            cgroup_id: 0,
            dir: cg.dir(&t.path),
            level: cg.level(&t.path),
            mode: Mode::Enforce,
            max_tasks: t.max_tasks,
            max_threads: t.max_threads,
            max_age: None,
            on_max_age: OnMaxAge::Event,
            backstop: None,
        })
        .collect()
}
