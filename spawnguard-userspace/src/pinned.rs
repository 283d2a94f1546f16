//! The installed enforcer's pinned maps, through typed handles. Which map holds which key and
//! value is written here once; status, breaker, gate, events and the daemon's sweeps open maps
//! through it. (The enforcer itself, installing and adopting, works on its own copy in
//! `loader`.)

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use spawnguard_common::{
    maps, BreakerLimits, BreakerState, Condemned, GlobalCounters, HostLimits, HostState,
    InstanceState, ProcessRecord, ReleasingTask, TypeCounters, TypeLimits, TypeState, MAX_TYPES,
};
use spawnguard_ebpf::policy_index;

use crate::loader::{installed_policy_side, open_installed};

/// One opener per map: `fn name() -> Result<Kind<MapData, K, V>>`.
macro_rules! pinned_maps {
    ($($(#[$doc:meta])* $fn:ident: $kind:ident<$($t:ty),+> = $name:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $fn() -> Result<$kind<MapData, $($t),+>> {
                Ok($kind::try_from(open_installed(maps::$name)?)?)
            }
        )*
    };
}

pinned_maps! {
    /// Which side of the double-buffered policy maps is in force (element 0; its low bit).
    policy_side_map: Array<u32> = POLICY_SIDE;
    /// Both sides of every type's limits (index with `policy_index`).
    type_policy: Array<TypeLimits> = TYPE_POLICY;
    /// Live instances and tasks per type slot.
    type_state: Array<TypeState> = TYPE_STATE;
    /// Both sides of the host budget (index: the side).
    host_limits: Array<HostLimits> = HOST_LIMITS;
    host_state: Array<HostState> = HOST_STATE;
    /// Both sides of every type's breaker policy (index with `policy_index`).
    breaker_limits: Array<BreakerLimits> = BREAKER_LIMITS;
    /// Per type slot.
    breaker_state: Array<BreakerState> = BREAKER_STATE;
    /// Key: the instance's cgroup id.
    instances: HashMap<u64, InstanceState> = INSTANCES;
    /// Key: an instance directory's cgroup id; value: its creation time.
    created: HashMap<u64, u64> = CREATED;
    /// Key: tgid.
    processes: HashMap<u32, ProcessRecord> = PROCESSES;
    /// Key: pid; tasks refused that the sys_exit hook kills.
    doomed: HashMap<u32, u32> = DOOMED;
    /// Key: tgid.
    condemned: HashMap<u32, Condemned> = CONDEMNED;
    /// Key: task_struct address.
    releasing: HashMap<u64, ReleasingTask> = RELEASING;
    /// Per type slot, per CPU.
    type_counters: PerCpuArray<TypeCounters> = TYPE_COUNTERS;
    global_counters: PerCpuArray<GlobalCounters> = GLOBAL_COUNTERS;
}

/// The kernel's event ring (reading it consumes it).
pub fn events() -> Result<RingBuf<MapData>> {
    Ok(RingBuf::try_from(open_installed(maps::EVENTS)?)?)
}

/// The side of the double-buffered policy maps in force.
pub fn policy_side() -> Result<u32> {
    installed_policy_side()
}

/// The types of the policy in force: each slot that holds one, with its limits.
pub fn types() -> Result<Vec<(u32, TypeLimits)>> {
    let limits = type_policy()?;
    let side = policy_side()?;
    let mut out = Vec::new();
    for index in 0..MAX_TYPES {
        let l = limits.get(&policy_index(side, index), 0)?;
        if l.active != 0 {
            out.push((index, l));
        }
    }
    Ok(out)
}
