//! `spawnguard status`: read straight from the pinned maps, so it works whether or not the
//! daemon answers.

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use serde::{Deserialize, Serialize};
use spawnguard_common::{
    limit, maps, BreakerPhase, FailOpen, InstanceState, Reason, TypeCounters, TypeLimits,
    TypeState, BREAKER_STATES, MODE_ENFORCE, REASONS,
};

use crate::pinned;
use crate::{
    events::Names,
    host::{self, monotonic_ns},
    loader::{name_of, DaemonState},
    policy::Mode,
};

/// Denials per reason (the budget that refused).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Denials {
    pub max_tasks: u64,
    pub max_threads: u64,
    pub fork_rate: u64,
    pub max_instances: u64,
    pub max_total_tasks: u64,
    pub host_max_tasks: u64,
    pub max_age: u64,
    pub breaker_open: u64,
}

impl Denials {
    /// From the per-reason counters (indexed by `Reason`).
    fn from(c: [u64; REASONS]) -> Self {
        Self {
            max_tasks: c[Reason::MaxTasks as usize],
            max_threads: c[Reason::MaxThreads as usize],
            fork_rate: c[Reason::ForkRate as usize],
            max_instances: c[Reason::MaxInstances as usize],
            max_total_tasks: c[Reason::TypeTasks as usize],
            host_max_tasks: c[Reason::HostTasks as usize],
            max_age: c[Reason::MaxAge as usize],
            breaker_open: c[Reason::BreakerOpen as usize],
        }
    }

    /// (reason name, count) for every reason, in `Reason` order.
    pub fn by_reason(&self) -> [(&'static str, u64); REASONS] {
        let n = [
            self.max_tasks,
            self.max_threads,
            self.fork_rate,
            self.max_instances,
            self.max_total_tasks,
            self.host_max_tasks,
            self.max_age,
            self.breaker_open,
        ];
        std::array::from_fn(|r| (Reason::ALL[r].name(), n[r]))
    }

    /// The sum (saturating: the counters are read from maps as they are).
    pub fn total(&self) -> u64 {
        self.by_reason()
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BreakerEntered {
    pub closed: u64,
    pub open: u64,
    pub half_open: u64,
}

impl BreakerEntered {
    /// (state, transitions into it) for every breaker state, in `BreakerPhase` order.
    pub fn by_state(&self) -> [(BreakerPhase, u64); BREAKER_STATES] {
        let n = [self.closed, self.open, self.half_open];
        std::array::from_fn(|s| (BreakerPhase::ALL[s], n[s]))
    }
}

/// Tasks let through uncounted, by why (the kernel side fails open, never closed).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FailedOpen {
    pub instances_full: u64,
    pub processes_full: u64,
    pub doomed_full: u64,
    pub read_error: u64,
    pub contended: u64,
    pub kill_failed: u64,
}

impl FailedOpen {
    /// (why, count) for every way a task is let through uncounted, in `FailOpen` order.
    pub fn by_cause(&self) -> [(FailOpen, u64); 6] {
        [
            (FailOpen::InstancesFull, self.instances_full),
            (FailOpen::ProcessesFull, self.processes_full),
            (FailOpen::DoomedFull, self.doomed_full),
            (FailOpen::ReadError, self.read_error),
            (FailOpen::Contended, self.contended),
            (FailOpen::KillFailed, self.kill_failed),
        ]
    }

    /// The sum (saturating: the counters are read from maps as they are).
    pub fn total(&self) -> u64 {
        self.by_cause()
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }
}

/// How full one of the kernel's hash maps is (past capacity, new entries fail open).
#[derive(Debug, Serialize, Deserialize)]
pub struct MapUsage {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TypeStatus {
    pub name: String,
    pub mode: String,
    pub max_tasks: u64,
    pub max_threads: u64,
    pub max_instances: Option<u64>,
    pub max_total_tasks: Option<u64>,
    /// Usage at which a warning fires (`warn_at` of each budget): per instance, for all the
    /// type's instances together, and of its instance ceiling (none where there is no budget).
    #[serde(default)]
    pub warn_tasks: u64,
    #[serde(default)]
    pub warn_total_tasks: Option<u64>,
    #[serde(default)]
    pub warn_instances: Option<u64>,
    /// Admitted instances (holding a `max_instances` slot).
    pub instances: u64,
    /// Live tasks of all instances of the type.
    pub tasks: u64,
    pub processes: u64,
    pub threads: u64,
    pub forks_allowed: u64,
    pub threads_allowed: u64,
    pub migrations_in: u64,
    pub migrations_denied: u64,
    pub instances_admitted: u64,
    pub warnings: u64,
    /// Breaker transitions, by the state entered.
    pub breaker_entered: BreakerEntered,
    pub denied: Denials,
    pub audit_denied: Denials,
    /// The type's circuit breaker, when it has one.
    pub breaker: Option<crate::breaker::BreakerView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HostStatus {
    pub tasks: u64,
    pub max_tasks: Option<u64>,
    /// Tasks above which new tasks are denied (`max_tasks * deny_at`).
    pub deny_tasks: Option<u64>,
    /// Tasks at which a warning fires (`max_tasks * warn_at`).
    #[serde(default)]
    pub warn_tasks: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// cgroup id (inode of the instance directory).
    pub id: u64,
    pub path: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub tasks: u64,
    /// Holds one of its type's `max_instances` slots (it has live tasks).
    pub admitted: bool,
    pub processes: u64,
    pub threads: u64,
    pub age_seconds: f64,
    /// Of `tasks`, those that exited and wait to be reaped (zombies; they hold PIDs).
    #[serde(default)]
    pub exited_unreaped: u64,
    /// Refused children (killed) not yet reaped: not in `tasks`, but holding PIDs.
    #[serde(default)]
    pub refused_unreaped: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// Pid of the daemon that pinned the maps, if it still runs.
    pub daemon_pid: Option<u32>,
    pub backend: Option<String>,
    pub host: HostStatus,
    pub types: Vec<TypeStatus>,
    pub instances: Vec<InstanceStatus>,
    pub events_dropped: u64,
    pub failed_open: u64,
    #[serde(default)]
    pub failed_open_by: FailedOpen,
    #[serde(default)]
    pub maps: Vec<MapUsage>,
    /// Instance entries dropped when their last task left (empty instances cost no entry).
    #[serde(default)]
    pub entries_reclaimed: u64,
    /// Of those, the ones the daemon's sweep gave back: entries left empty where no last task
    /// could (a close that missed the emulated lock, a first task refused, processes moved out).
    #[serde(default)]
    pub entries_settled: u64,
    /// Charges of exited tasks the kernel's free hook never gave back, given back later: by the
    /// daemon's sweep (the task gone), or when a new task got the task's memory.
    #[serde(default)]
    pub released_late: u64,
    /// Instance counts found below zero and clamped (a release of what was never counted): 0
    /// unless the kernel side lost track somewhere.
    #[serde(default)]
    pub count_drift: u64,
    /// Instance directories whose creation time could not be kept (the map of creation times
    /// was full): their `max_age` counts from their first task.
    #[serde(default)]
    pub created_full: u64,
    /// Exited tasks given back at once because the map of unreaped tasks was full.
    #[serde(default)]
    pub releasing_full: u64,
}

/// Everything the pinned maps say, with each instance's path resolved (for `status`).
pub fn read() -> Result<Status> {
    let mut s = snapshot()?;
    let daemon = DaemonState::read();
    let mut names = Names::new(daemon.map(|d| d.types).unwrap_or_default());
    for i in &mut s.instances {
        i.path = names.instance(i.id);
    }
    s.instances.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(s)
}

/// An instance's age and type slot, from the instance map alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InstanceAge {
    pub id: u64,
    pub type_idx: u32,
    pub age_seconds: f64,
}

/// The instance map of the installed enforcer, opened once by whoever reads it often.
pub type InstanceMap = HashMap<MapData, u64, InstanceState>;

pub fn open_instance_map() -> Result<InstanceMap> {
    pinned::instances()
}

/// Every instance's age (what the max-age watch reads twice a second: one batched read of one
/// map, not the whole snapshot).
pub fn instance_ages(instances: &InstanceMap) -> Result<Vec<InstanceAge>> {
    let now = monotonic_ns();
    Ok(crate::mapbatch::entries(instances)?
        .into_iter()
        .map(|(id, s)| InstanceAge {
            id,
            type_idx: s.type_idx,
            age_seconds: now.saturating_sub(s.created_ns) as f64 / 1e9,
        })
        .collect())
}

/// Everything the pinned maps say; instance paths left empty (resolving 10,000 of them costs
/// more than reading the maps: `metrics` resolves only those it shows).
pub fn snapshot() -> Result<Status> {
    let type_state = pinned::type_state()?;
    let host_limits = pinned::host_limits()?;
    let host_state = pinned::host_state()?;
    let instances = pinned::instances()?;
    let counters = pinned::type_counters()?;
    let global = pinned::global_counters()?;
    let processes = pinned::processes()?;
    let doomed = pinned::doomed()?;
    let releasing = pinned::releasing()?;
    let daemon = DaemonState::read();

    let side = pinned::policy_side()?;
    let mut types = Vec::new();
    for (index, b) in pinned::types()? {
        let live = type_state.get(&index, 0)?;
        let t = type_status(&b, &live, &counters.get(&index, 0)?);
        types.push((index, t));
    }

    let now = monotonic_ns();
    let mut list = Vec::new();
    let all = crate::mapbatch::entries(&instances)?;
    let instance_entries = all.len() as u64;
    for (id, s) in all {
        let Some((_, t)) = types.iter_mut().find(|(i, _)| *i == s.type_idx) else {
            continue;
        };
        t.processes = t.processes.saturating_add(s.processes);
        t.threads = t.threads.saturating_add(s.threads);
        list.push(instance_status(id, &s, &t.name, now));
    }
    let mut dropped = 0u64;
    let mut f = FailedOpen::default();
    let (mut reclaimed, mut settled, mut created_full, mut releasing_full) =
        (0u64, 0u64, 0u64, 0u64);
    let (mut released_late, mut count_drift) = (0u64, 0u64);
    for g in global.get(&0, 0)?.iter() {
        dropped = dropped.saturating_add(g.events_dropped);
        f.instances_full = f.instances_full.saturating_add(g.instances_full);
        f.processes_full = f.processes_full.saturating_add(g.processes_full);
        f.doomed_full = f.doomed_full.saturating_add(g.doomed_full);
        f.read_error = f.read_error.saturating_add(g.read_errors);
        f.contended = f.contended.saturating_add(g.contended);
        f.kill_failed = f.kill_failed.saturating_add(g.kill_failed);
        reclaimed = reclaimed.saturating_add(g.reclaimed);
        settled = settled.saturating_add(g.settled);
        released_late = released_late.saturating_add(g.released_late);
        count_drift = count_drift.saturating_add(g.drift);
        created_full = created_full.saturating_add(g.created_full);
        releasing_full = releasing_full.saturating_add(g.releasing_full);
    }
    let created = pinned::created()?;
    let maps = vec![
        MapUsage {
            map: maps::INSTANCES.to_lowercase(),
            entries: instance_entries,
            capacity: capacity(maps::INSTANCES, spawnguard_common::MAX_INSTANCES),
        },
        MapUsage {
            map: maps::CREATED.to_lowercase(),
            entries: created.keys().count() as u64,
            capacity: capacity(maps::CREATED, spawnguard_common::MAX_CREATED),
        },
        MapUsage {
            map: maps::PROCESSES.to_lowercase(),
            entries: crate::mapbatch::entries(&processes)?.len() as u64,
            capacity: capacity(maps::PROCESSES, spawnguard_common::MAX_PROCESSES),
        },
        MapUsage {
            map: maps::DOOMED.to_lowercase(),
            entries: crate::mapbatch::entries(&doomed)?.len() as u64,
            capacity: capacity(maps::DOOMED, spawnguard_common::MAX_DOOMED),
        },
        MapUsage {
            map: maps::RELEASING.to_lowercase(),
            entries: crate::mapbatch::entries(&releasing)?.len() as u64,
            capacity: capacity(maps::RELEASING, spawnguard_common::MAX_RELEASING),
        },
    ];
    let hl = host_limits.get(&side, 0)?;
    let host = HostStatus {
        tasks: host_state.get(&0, 0)?.tasks,
        max_tasks: limit(hl.max_tasks),
        deny_tasks: limit(hl.deny_tasks),
        warn_tasks: limit(hl.warn_tasks),
    };
    let breakers = crate::breaker::status(None).unwrap_or_default();
    for (_, t) in &mut types {
        t.breaker = breakers.iter().find(|b| b.type_name == t.name).cloned();
    }
    Ok(Status {
        daemon_pid: daemon
            .as_ref()
            .map(|d| d.pid)
            .filter(|&p| host::pid_alive(p)),
        backend: daemon.map(|d| d.backend.name().to_owned()),
        host,
        types: types.into_iter().map(|(_, t)| t).collect(),
        instances: list,
        events_dropped: dropped,
        failed_open: f.total(),
        failed_open_by: f,
        maps,
        entries_reclaimed: reclaimed,
        entries_settled: settled,
        released_late,
        count_drift,
        created_full,
        releasing_full,
    })
}

/// One type's status from its map values: its limits, its live counts and its per-CPU
/// counters (any values: a map is read as it is).
pub fn type_status(b: &TypeLimits, live: &TypeState, per_cpu: &[TypeCounters]) -> TypeStatus {
    let mut t = TypeStatus {
        name: name_of(&b.name),
        mode: if b.mode == MODE_ENFORCE {
            Mode::Enforce
        } else {
            Mode::Audit
        }
        .to_string(),
        max_tasks: b.max_tasks,
        max_threads: b.max_threads,
        max_instances: limit(b.max_instances),
        max_total_tasks: limit(b.max_total_tasks),
        warn_tasks: b.warn_tasks,
        warn_total_tasks: limit(b.warn_total_tasks),
        warn_instances: limit(b.warn_instances),
        instances: live.instances,
        tasks: live.tasks,
        processes: 0,
        threads: 0,
        forks_allowed: 0,
        threads_allowed: 0,
        migrations_in: 0,
        migrations_denied: 0,
        instances_admitted: 0,
        warnings: 0,
        breaker_entered: BreakerEntered::default(),
        denied: Denials::default(),
        audit_denied: Denials::default(),
        breaker: None,
    };
    let mut denied = [0u64; REASONS];
    let mut audit = [0u64; REASONS];
    for c in per_cpu {
        t.forks_allowed = t.forks_allowed.saturating_add(c.forks_allowed);
        t.threads_allowed = t.threads_allowed.saturating_add(c.threads_allowed);
        t.migrations_in = t.migrations_in.saturating_add(c.migrations_in);
        t.migrations_denied = t.migrations_denied.saturating_add(c.migrations_denied);
        t.instances_admitted = t.instances_admitted.saturating_add(c.instances_admitted);
        t.warnings = t.warnings.saturating_add(c.warnings);
        t.breaker_entered.closed = t
            .breaker_entered
            .closed
            .saturating_add(c.breaker_entered[BreakerPhase::Closed as usize]);
        t.breaker_entered.open = t
            .breaker_entered
            .open
            .saturating_add(c.breaker_entered[BreakerPhase::Open as usize]);
        t.breaker_entered.half_open = t
            .breaker_entered
            .half_open
            .saturating_add(c.breaker_entered[BreakerPhase::HalfOpen as usize]);
        for r in 0..REASONS {
            denied[r] = denied[r].saturating_add(c.denied[r]);
            audit[r] = audit[r].saturating_add(c.audit_denied[r]);
        }
    }
    t.denied = Denials::from(denied);
    t.audit_denied = Denials::from(audit);
    t
}

/// One instance's status from its instance map entry (`now`: monotonic ns).
pub fn instance_status(id: u64, s: &InstanceState, type_name: &str, now: u64) -> InstanceStatus {
    InstanceStatus {
        id,
        path: String::new(),
        type_name: type_name.to_owned(),
        tasks: spawnguard_ebpf::word_tasks(s.tasks),
        admitted: s.tasks & spawnguard_ebpf::ADMITTED != 0,
        processes: s.processes,
        threads: s.threads,
        age_seconds: now.saturating_sub(s.created_ns) as f64 / 1e9,
        exited_unreaped: s.releasing,
        refused_unreaped: s.refused_unreaped,
    }
}

/// A pinned map's capacity, as the kernel made it (`run --instance-capacity` sets some).
fn capacity(name: &str, default: u32) -> u64 {
    aya::maps::MapInfo::from_pin(crate::loader::pin_dir().join("maps").join(name))
        .map_or(default, |i| i.max_entries())
        .into()
}

/// Share of a map's capacity at which `status` and `doctor` warn: well before it is full (a
/// new instance past capacity runs uncounted).
pub const MAP_WARN_AT: f64 = 0.80;

impl MapUsage {
    /// A warning when the map is over `MAP_WARN_AT` full, saying what happens when it is full.
    pub fn warning(&self) -> Option<String> {
        if (self.entries as f64) < self.capacity as f64 * MAP_WARN_AT {
            return None;
        }
        let what = match self.map.as_str() {
            "instances" => {
                "instances that hold tasks; when it is full a new instance runs uncounted \
                 (instances already counted stay enforced); raise `spawnguard run \
                 --instance-capacity`"
            }
            "created" => {
                "instance directories (empty ones too); when it is full a new instance's \
                 max_age counts from its first task; remove the directories of ended agents"
            }
            "releasing" => {
                "exited tasks not yet reaped; when it is full an exited task's charge is given \
                 back at its exit, while its zombie still holds a PID"
            }
            _ => "entries; when it is full new tasks run uncounted",
        };
        Some(format!(
            "map {} is {:.0}% full ({}/{} {what})",
            self.map,
            self.entries as f64 * 100.0 / self.capacity.max(1) as f64,
            self.entries,
            self.capacity
        ))
    }
}

/// A figure, or "-" where there is none (no limit).
pub fn or_dash(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz finding (maps target): per-CPU counters summed past u64 (a map read as it is, all
    /// ones) overflowed in `Denials::total`; the sums now saturate.
    #[test]
    fn counters_read_as_all_ones_saturate() {
        let ones = TypeCounters {
            forks_allowed: u64::MAX,
            threads_allowed: u64::MAX,
            denied: [u64::MAX; REASONS],
            audit_denied: [u64::MAX; REASONS],
            ..Default::default()
        };
        let t = type_status(&TypeLimits::default(), &TypeState::default(), &[ones, ones]);
        assert_eq!(t.forks_allowed, u64::MAX);
        assert_eq!(t.denied.max_tasks, u64::MAX);
        assert_eq!(t.denied.total(), u64::MAX);
        let f = FailedOpen {
            instances_full: u64::MAX,
            kill_failed: 1,
            ..Default::default()
        };
        assert_eq!(f.total(), u64::MAX);
    }
}
