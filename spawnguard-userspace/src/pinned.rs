//! The installed enforcer's pinned maps, through typed handles. Which map holds which key and
//! value is written here once; status, breaker, gate, events and the daemon's sweeps open maps
//! through it. (The enforcer itself, installing and adopting, works on its own copy in
//! `loader`.)

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
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
                $kind::try_from(open_installed(maps::$name)?)
                    .map_err(|e| layout_error(maps::$name, e))
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

/// A pinned map whose key or value is not the size this spawnguard reads: refused, never read
/// as if it were (its bytes would mean something else).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "pinned map {map} has {part}s of {found} bytes where this spawnguard reads {expected}: it \
     was made by a spawnguard of another map layout (use that one, or migrate: see `spawnguard \
     run`)"
)]
pub struct LayoutError {
    pub map: String,
    /// "key" or "value".
    pub part: &'static str,
    /// The pinned map's size.
    pub found: usize,
    /// The size of the type this spawnguard reads it as.
    pub expected: usize,
}

/// aya's size check, as a `LayoutError` that names the map; other errors pass through.
fn layout_error(map: &str, e: MapError) -> anyhow::Error {
    // aya calls the Rust type's size `size` and the map's own size `expected`.
    let (part, ours, theirs) = match e {
        MapError::InvalidKeySize { size, expected } => ("key", size, expected),
        MapError::InvalidValueSize { size, expected } => ("value", size, expected),
        e => return anyhow::Error::from(e).context(format!("opening pinned map {map}")),
    };
    LayoutError {
        map: map.to_owned(),
        part,
        found: theirs,
        expected: ours,
    }
    .into()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of another layout (here: `InstanceState` grown or shrunk, a `u32` key where a
    /// `u64` is read) is refused with both sizes and the map's name, as aya's size check finds
    /// it when `pinned` opens the map.
    #[test]
    fn a_map_of_another_layout_is_refused_naming_it_and_both_sizes() {
        let ours = size_of::<InstanceState>();
        let e = layout_error(
            maps::INSTANCES,
            MapError::InvalidValueSize {
                size: ours,
                expected: ours - 8,
            },
        );
        let layout = e.downcast_ref::<LayoutError>().expect("a LayoutError");
        assert_eq!(
            layout,
            &LayoutError {
                map: maps::INSTANCES.to_owned(),
                part: "value",
                found: ours - 8,
                expected: ours,
            }
        );
        let text = e.to_string();
        assert!(text.contains(maps::INSTANCES), "{text}");
        assert!(
            text.contains(&format!("values of {} bytes", ours - 8)),
            "{text}"
        );
        assert!(text.contains(&format!("reads {ours}")), "{text}");

        let e = layout_error(
            maps::PROCESSES,
            MapError::InvalidKeySize {
                size: 4,
                expected: 8,
            },
        );
        assert_eq!(
            e.downcast_ref::<LayoutError>(),
            Some(&LayoutError {
                map: maps::PROCESSES.to_owned(),
                part: "key",
                found: 8,
                expected: 4,
            })
        );
        // Anything else is not a layout error.
        let e = layout_error(maps::EVENTS, MapError::InvalidMapType { map_type: 99 });
        assert!(e.downcast_ref::<LayoutError>().is_none());
        assert!(e.to_string().contains(maps::EVENTS));
    }
}
