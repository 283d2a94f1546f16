//! The policy in the maps: the policy's types placed on the hierarchy, their limits in kernel
//! form, the double-buffered policy maps and the switch between their sides, and the type
//! slots (`assign_indices`, `clear_slot`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap, PerCpuArray, PerCpuValues};
use serde::{Deserialize, Serialize};
use spawnguard_common::{
    maps, BreakerLimits, BreakerState, HostLimits, InstanceState, TypeCounters, TypeDir,
    TypeLevels, TypeLimits, TypeState, MAX_TYPES, MAX_TYPE_LEVELS, MODE_AUDIT, MODE_ENFORCE,
    NO_LIMIT, ON_MAX_AGE_EVENT, ON_MAX_AGE_FREEZE, ON_MAX_AGE_KILL, TYPE_NAME_LEN,
};
use spawnguard_ebpf::{policy_index, rate_interval_ns, rate_window_ns};

use super::{open_pinned, policy_side, Enforcer};
use crate::{
    cgroupfs::{self, Cgroup2},
    policy::{Mode, OnMaxAge, Policy},
};

/// One type of the policy, placed on this host's cgroup2 hierarchy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlacedType {
    pub name: String,
    pub index: u32,
    /// Absolute path of the type directory.
    pub dir: PathBuf,
    pub cgroup_id: u64,
    pub level: u32,
    pub mode: Mode,
    pub max_tasks: u64,
    pub max_threads: u64,
    pub max_age: Option<std::time::Duration>,
    pub on_max_age: OnMaxAge,
    /// The `pids.max` the backstop writes in its instances (`max_tasks` where enforced; none
    /// in audit or for an exempt type, which are never denied).
    #[serde(default)]
    pub backstop: Option<u64>,
}

/// Puts the policy's types on the hierarchy: creates missing type directories and reads their ids.
pub fn place_types(policy: &Policy, cg: &Cgroup2) -> Result<Vec<PlacedType>> {
    policy
        .types
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let dir = cg.dir(&t.path);
            cgroupfs::ensure_dir(&dir)
                .with_context(|| format!("creating the directory of type \"{}\"", t.name))?;
            Ok(PlacedType {
                name: t.name.clone(),
                index: index as u32,
                cgroup_id: cgroupfs::cgroup_id(&dir)?,
                level: cg.level(&t.path),
                dir,
                mode: t.mode,
                max_tasks: t.max_tasks,
                max_threads: t.max_threads,
                max_age: t.max_age,
                on_max_age: t.on_max_age,
                backstop: (t.effective_mode() == Mode::Enforce).then_some(t.max_tasks),
            })
        })
        .collect()
}

/// Usage at which `warn_at` of `limit` is reached (at least 1).
fn warn_threshold(limit: u64, warn_at: f64) -> u64 {
    if limit == NO_LIMIT {
        NO_LIMIT
    } else {
        ((limit as f64 * warn_at).ceil() as u64).max(1)
    }
}

/// The kernel form of a type's limits.
pub fn type_limits(policy: &Policy, index: usize) -> TypeLimits {
    let t = &policy.types[index];
    let warn_at = policy.host.warn_at;
    let mut name = [0u8; TYPE_NAME_LEN];
    name[..t.name.len()].copy_from_slice(t.name.as_bytes());
    let (interval, burst) = match t.fork_rate {
        Some(r) => (
            rate_interval_ns((r.per_sec * 1000.0).round().max(1.0) as u64),
            r.burst,
        ),
        None => (0, 0),
    };
    let max_instances = t.max_instances.unwrap_or(NO_LIMIT);
    let max_total_tasks = t.max_total_tasks.unwrap_or(NO_LIMIT);
    TypeLimits {
        max_tasks: t.max_tasks,
        max_threads: t.max_threads,
        rate_interval_ns: interval,
        rate_burst: burst,
        rate_window_ns: rate_window_ns(interval, burst),
        max_instances,
        max_total_tasks,
        warn_tasks: warn_threshold(t.max_tasks, warn_at),
        warn_total_tasks: warn_threshold(max_total_tasks, warn_at),
        warn_instances: warn_threshold(max_instances, warn_at),
        max_age_ns: t
            .max_age
            .map_or(NO_LIMIT, |d| d.as_nanos().min(u128::from(NO_LIMIT)) as u64),
        on_max_age: match t.on_max_age {
            OnMaxAge::Event => ON_MAX_AGE_EVENT,
            OnMaxAge::Freeze => ON_MAX_AGE_FREEZE,
            OnMaxAge::Kill => ON_MAX_AGE_KILL,
        },
        rate_gen: 0,
        mode: match t.effective_mode() {
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        active: 1,
        name,
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX >> 8)) as u64
}

/// The kernel form of a type's breaker (disabled when the type has none).
pub fn breaker_limits(policy: &Policy, index: usize) -> BreakerLimits {
    let Some(b) = &policy.types[index].breaker else {
        return BreakerLimits::default();
    };
    let mut open_for_ms = [0; spawnguard_common::BREAKER_STEPS];
    for (slot, d) in open_for_ms.iter_mut().zip(&b.open_for) {
        *slot = ms(*d);
    }
    BreakerLimits {
        enabled: 1,
        _pad: 0,
        startup_window_ms: ms(b.startup_window),
        failures: b.failures,
        within_ms: ms(b.within),
        open_for_ms,
        steps: b.open_for.len() as u64,
        storm_denials: b.storm_denials.unwrap_or(0),
        storm_within_ms: b.storm_within.map_or(0, ms),
    }
}

/// The kernel form of the host budget.
pub fn host_limits(policy: &Policy) -> HostLimits {
    match policy.host.max_tasks {
        None => HostLimits::default(),
        Some(max) => HostLimits {
            max_tasks: max,
            deny_tasks: (max as f64 * policy.host.deny_at).floor() as u64,
            warn_tasks: warn_threshold(max, policy.host.warn_at),
        },
    }
}

/// Puts the side just written in force (one 4-byte write the kernel sees at once), then waits
/// until no program can still be reading the other side, so that the next policy may be
/// written there: the programs run under RCU, and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits
/// for an RCU grace period.
fn switch_policy_side(dir: &Path, next: u32) -> Result<()> {
    let mut side: Array<_, u32> = Array::try_from(open_pinned(dir, maps::POLICY_SIDE)?)?;
    side.set(0, next, 0)?;
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier(cmd, flags, cpu_id) takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // nohz_full hosts refuse it: a program runs for microseconds, so a pause far longer
        // than that stands in for the grace period.
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Enforcer {
    /// The name of the type in each slot of the policy in force (`None`: free).
    pub(super) fn types_in_force(&self) -> Result<Vec<Option<String>>> {
        let side = policy_side(&self.dir)?;
        let limits: Array<_, TypeLimits> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_POLICY)?)?;
        let mut names = Vec::new();
        for index in 0..MAX_TYPES {
            let l = limits.get(&policy_index(side, index), 0)?;
            names.push((l.active != 0).then(|| name_of(&l.name)));
        }
        Ok(names)
    }

    /// Puts `policy` in the maps. Types keep their slot (index) across policy changes and
    /// restarts, matched by name, so live counts stay with their type. The types named in
    /// `audit` are loaded in audit mode (while the agents already running in them are counted).
    pub fn apply_policy(
        &self,
        policy: &Policy,
        types: &mut [PlacedType],
        audit: &[String],
    ) -> Result<()> {
        if types.len() > MAX_TYPES as usize {
            bail!("at most {MAX_TYPES} types are supported");
        }
        // The policy in force is on one side of the policy maps; the new one is written whole
        // on the other, then the kernel is switched to it at once (see `switch_policy_side`).
        let side = policy_side(&self.dir)?;
        let next = side ^ 1;
        let mut limits: Array<_, TypeLimits> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_POLICY)?)?;
        let existing = self.types_in_force()?;
        // A removed type's slot keeps counting its instances that still run (their exits give
        // back there): a new type must not inherit those totals.
        let type_state: Array<_, TypeState> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_STATE)?)?;
        let mut holds = Vec::new();
        for index in 0..MAX_TYPES {
            let t = type_state.get(&index, 0)?;
            holds.push(t.tasks != 0 || t.instances != 0);
        }
        // The slot a type's running agents are counted in, when that is no longer their type's
        // (the type was renamed, or removed and added again under another name): the type
        // takes it back with its counts and breaker, so forks and exits meet in one slot.
        let instances: HashMap<_, u64, InstanceState> =
            HashMap::try_from(open_pinned(&self.dir, maps::INSTANCES)?)?;
        let counted_in: Vec<Option<u32>> = types
            .iter()
            .map(|t| {
                cgroupfs::children(&t.dir)
                    .iter()
                    .filter_map(|inst| cgroupfs::cgroup_id(inst).ok())
                    .find_map(|id| instances.get(&id, 0).ok().map(|s| s.type_idx))
            })
            .collect();
        let indices = assign_indices(&existing, &holds, &counted_in, types)?;
        for ((t, index), counted) in types.iter_mut().zip(&indices).zip(&counted_in) {
            t.index = *index;
            let kept = existing[*index as usize].as_deref() == Some(t.name.as_str());
            if !kept && *counted != Some(*index) {
                self.clear_slot(*index)?;
            }
            if counted.is_some_and(|c| c != *index) {
                tracing::warn!(
                    "type {}: running instances at its path are counted in another type's slot \
                     (a type moved away from this path while they run): until they end, they \
                     stay counted there and held to that type's budget; new instances are {}'s",
                    t.name,
                    t.name
                );
            }
        }
        let mut levels: Vec<u32> = Vec::new();
        for t in types.iter() {
            if !levels.contains(&t.level) {
                levels.push(t.level);
            }
        }
        if levels.len() > MAX_TYPE_LEVELS {
            bail!(
                "type directories sit at {} different depths of the cgroup tree; at most \
                 {MAX_TYPE_LEVELS} are supported (put types side by side)",
                levels.len()
            );
        }
        // Every slot of the next side: a type no longer in the policy gets an empty one (its
        // instances stop being enforced).
        let mut next_limits = vec![TypeLimits::default(); MAX_TYPES as usize];
        let mut next_breakers = vec![BreakerLimits::default(); MAX_TYPES as usize];
        for (i, t) in types.iter().enumerate() {
            let mut l = type_limits(policy, i);
            if audit.contains(&t.name) {
                l.mode = MODE_AUDIT;
            }
            l.rate_gen = rate_generation(&limits.get(&policy_index(side, t.index), 0)?, &l);
            next_limits[t.index as usize] = l;
            next_breakers[t.index as usize] = breaker_limits(policy, i);
        }
        let mut breakers: Array<_, BreakerLimits> =
            Array::try_from(open_pinned(&self.dir, maps::BREAKER_LIMITS)?)?;
        for index in 0..MAX_TYPES {
            let key = policy_index(next, index);
            limits.set(key, next_limits[index as usize], 0)?;
            breakers.set(key, next_breakers[index as usize], 0)?;
        }
        let mut host: Array<_, HostLimits> =
            Array::try_from(open_pinned(&self.dir, maps::HOST_LIMITS)?)?;
        host.set(next, host_limits(policy), 0)?;
        let mut level_map: Array<_, TypeLevels> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_LEVELS)?)?;
        let mut type_levels = TypeLevels {
            count: levels.len() as u32,
            ..TypeLevels::default()
        };
        type_levels.levels[..levels.len()].copy_from_slice(&levels);
        level_map.set(next, type_levels, 0)?;
        switch_policy_side(&self.dir, next)?;
        let mut dirs: HashMap<_, u64, TypeDir> =
            HashMap::try_from(open_pinned(&self.dir, maps::TYPE_DIRS)?)?;
        let stale: Vec<u64> = dirs
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !types.iter().any(|t| t.cgroup_id == *id))
            .collect();
        for t in types.iter() {
            let dir = TypeDir {
                type_idx: t.index,
                level: t.level,
            };
            dirs.insert(t.cgroup_id, dir, 0)?;
        }
        for id in stale {
            dirs.remove(&id)?;
        }
        self.follow_type_paths(policy, types)?;
        Ok(())
    }

    /// Clears what a slot's previous type left (its breaker's state and its counters) before a
    /// new type takes it. Its totals are zero: `assign_indices` only hands out such slots.
    fn clear_slot(&self, index: u32) -> Result<()> {
        let mut breakers: Array<_, BreakerState> =
            Array::try_from(open_pinned(&self.dir, maps::BREAKER_STATE)?)?;
        breakers.set(index, BreakerState::default(), 0)?;
        let mut counters: PerCpuArray<_, TypeCounters> =
            PerCpuArray::try_from(open_pinned(&self.dir, maps::TYPE_COUNTERS)?)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("reading {what}: {e}"))?;
        counters.set(
            index,
            PerCpuValues::try_from(vec![TypeCounters::default(); cpus])?,
            0,
        )?;
        Ok(())
    }
}

/// The fork-rate generation of a type's new limits: the old one while its rate and burst stay
/// (and its slot keeps its owner), else the next, so the kernel starts its instances' buckets
/// full under the new rate.
fn rate_generation(old: &TypeLimits, new: &TypeLimits) -> u32 {
    let same = old.active != 0
        && old.name == new.name
        && old.rate_interval_ns == new.rate_interval_ns
        && old.rate_burst == new.rate_burst;
    if same {
        old.rate_gen
    } else {
        (old.rate_gen + 1) & 0xff
    }
}

/// A type name as the kernel keeps it (NUL-padded).
pub fn name_of(raw: &[u8]) -> String {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Slot of each type: its old slot when a type of that name exists; else the slot its running
/// agents are counted in (`counted_in`), when no type of the policy keeps that one by name; else
/// the first free one that holds no count (`holds`: a removed type's instances still count
/// there), preferring slots no type in force has.
fn assign_indices(
    existing: &[Option<String>],
    holds: &[bool],
    counted_in: &[Option<u32>],
    types: &[PlacedType],
) -> Result<Vec<u32>> {
    let mut taken: Vec<bool> = existing
        .iter()
        .map(|n| {
            n.as_ref()
                .is_some_and(|n| types.iter().any(|t| &t.name == n))
        })
        .collect();
    // In passes, so that no type takes as a free slot the one another's agents count in.
    let mut slots: Vec<Option<u32>> = types
        .iter()
        .map(|t| {
            existing
                .iter()
                .position(|n| n.as_deref() == Some(&t.name))
                .map(|i| i as u32)
        })
        .collect();
    for (slot, counted) in slots.iter_mut().zip(counted_in) {
        if slot.is_none() {
            if let Some(i) = counted.filter(|&i| taken.get(i as usize) == Some(&false)) {
                taken[i as usize] = true;
                *slot = Some(i);
            }
        }
    }
    types
        .iter()
        .zip(slots)
        .map(|(t, slot)| {
            if let Some(i) = slot {
                return Ok(i);
            }
            let free = (0..taken.len())
                .find(|&i| !taken[i] && !holds[i] && existing[i].is_none())
                .or_else(|| (0..taken.len()).find(|&i| !taken[i] && !holds[i]))
                .ok_or_else(|| {
                    anyhow!(
                        "no free type slot for type {:?}: the {MAX_TYPES} slots are in use, some \
                         by removed types whose instances still run (their counts stay there \
                         until they end)",
                        t.name
                    )
                })?;
            taken[free] = true;
            Ok(free as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::placed;

    #[test]
    fn a_new_type_never_takes_a_slot_that_still_counts_a_removed_type() {
        let text = "[[type]]\nname = \"kept\"\npath = \"a/k\"\nmax_tasks = 5\n\
                    [[type]]\nname = \"new\"\npath = \"a/n\"\nmax_tasks = 5\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let types = placed(&policy, "/cg");
        let none = vec![None; types.len()];
        let mut existing = vec![None; MAX_TYPES as usize];
        existing[0] = Some("removed".to_string());
        existing[1] = Some("kept".to_string());
        let mut holds = vec![false; MAX_TYPES as usize];
        // Slot 0: the removed type's instances still run. Slot 2: an older removed type's.
        holds[0] = true;
        holds[2] = true;
        assert_eq!(
            assign_indices(&existing, &holds, &none, &types).unwrap(),
            vec![1, 3],
            "kept keeps its slot; new skips the slots that still count"
        );
        // Once those instances ended, their slots are free again.
        let holds = vec![false; MAX_TYPES as usize];
        assert_eq!(
            assign_indices(&existing, &holds, &none, &types).unwrap(),
            vec![1, 2]
        );
        // Every free slot still counting: a clear error, nothing assigned.
        let mut holds = vec![true; MAX_TYPES as usize];
        holds[1] = false;
        let e = assign_indices(&existing, &holds, &none, &types).unwrap_err();
        assert!(
            e.to_string().contains("no free type slot for type \"new\""),
            "{e}"
        );
    }

    #[test]
    fn a_renamed_type_takes_back_the_slot_its_agents_count_in() {
        let text = "[[type]]\nname = \"kept\"\npath = \"a/k\"\nmax_tasks = 5\n\
                    [[type]]\nname = \"renamed\"\npath = \"a/r\"\nmax_tasks = 5\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let types = placed(&policy, "/cg");
        let mut existing = vec![None; MAX_TYPES as usize];
        existing[0] = Some("kept".to_string());
        existing[4] = Some("old-name".to_string());
        let mut holds = vec![false; MAX_TYPES as usize];
        holds[4] = true;
        // Renamed in this change (slot 4 had the old name), or removed earlier and added again
        // now (slot 4 empty but still counting): the agents' slot, counts and all.
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(4)], &types).unwrap(),
            vec![0, 4]
        );
        existing[4] = None;
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(4)], &types).unwrap(),
            vec![0, 4]
        );
        // Never a slot another type keeps by name: then the first free one.
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(0)], &types).unwrap(),
            vec![0, 1]
        );
        // A type placed earlier never takes the counted slot as a free one.
        let existing = vec![None; MAX_TYPES as usize];
        let holds = vec![false; MAX_TYPES as usize];
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(0)], &types).unwrap(),
            vec![1, 0]
        );
    }

    #[test]
    fn a_rate_change_moves_the_generation() {
        let text = "[[type]]\nname = \"a\"\npath = \"a\"\nmax_tasks = 5\n\
                    fork_rate = { burst = 4, per_sec = 0.1 }\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let mut old = type_limits(&policy, 0);
        old.rate_gen = 255;
        let mut same = type_limits(&policy, 0);
        same.max_tasks = 6;
        assert_eq!(rate_generation(&old, &same), 255, "other limits keep it");
        let mut faster = same;
        faster.rate_burst = 5;
        assert_eq!(
            rate_generation(&old, &faster),
            0,
            "a new burst moves it (mod 256)"
        );
        assert_eq!(
            rate_generation(&TypeLimits::default(), &same),
            1,
            "a slot with a new owner moves it"
        );
    }
}
