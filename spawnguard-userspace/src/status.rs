//! `spawnguard status`: read straight from the pinned maps, so it works whether or not the
//! daemon answers.

use std::path::Path;

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use spawnguard_common::{
    maps, GlobalCounters, HostLimits, HostState, InstanceState, TypeCounters, TypeLimits,
    TypeState, MAX_TYPES, MODE_ENFORCE, NO_LIMIT, REASONS,
};

use crate::{
    events::{reason_name, Names},
    loader::{name_of, open_installed, DaemonState},
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
    fn from(c: [u64; REASONS]) -> Self {
        Self {
            max_tasks: c[0],
            max_threads: c[1],
            fork_rate: c[2],
            max_instances: c[3],
            max_total_tasks: c[4],
            host_max_tasks: c[5],
            max_age: c[6],
            breaker_open: c[7],
        }
    }

    pub fn total(&self) -> u64 {
        self.max_tasks
            + self.max_threads
            + self.fork_rate
            + self.max_instances
            + self.max_total_tasks
            + self.host_max_tasks
            + self.max_age
            + self.breaker_open
    }
}

fn limit(v: u64) -> Option<u64> {
    (v != NO_LIMIT).then_some(v)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TypeStatus {
    pub name: String,
    pub mode: String,
    pub max_tasks: u64,
    pub max_threads: u64,
    pub max_instances: Option<u64>,
    pub max_total_tasks: Option<u64>,
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
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn read() -> Result<Status> {
    let budgets: Array<MapData, TypeLimits> = Array::try_from(open_installed(maps::TYPE_POLICY)?)?;
    let type_state: Array<MapData, TypeState> = Array::try_from(open_installed(maps::TYPE_STATE)?)?;
    let host_limits: Array<MapData, HostLimits> =
        Array::try_from(open_installed(maps::HOST_LIMITS)?)?;
    let host_state: Array<MapData, HostState> = Array::try_from(open_installed(maps::HOST_STATE)?)?;
    let instances: HashMap<MapData, u64, InstanceState> =
        HashMap::try_from(open_installed(maps::INSTANCES)?)?;
    let counters: PerCpuArray<MapData, TypeCounters> =
        PerCpuArray::try_from(open_installed(maps::TYPE_COUNTERS)?)?;
    let global: PerCpuArray<MapData, GlobalCounters> =
        PerCpuArray::try_from(open_installed(maps::GLOBAL_COUNTERS)?)?;
    let daemon = DaemonState::read();
    let mut names = Names::new(daemon.as_ref().map(|d| d.types.clone()).unwrap_or_default());

    let mut types = Vec::new();
    for index in 0..MAX_TYPES {
        let b = budgets.get(&index, 0)?;
        if b.active == 0 {
            continue;
        }
        let live = type_state.get(&index, 0)?;
        let mut t = TypeStatus {
            name: name_of(&b.name),
            mode: if b.mode == MODE_ENFORCE {
                "enforce"
            } else {
                "audit"
            }
            .to_owned(),
            max_tasks: b.max_tasks,
            max_threads: b.max_threads,
            max_instances: limit(b.max_instances),
            max_total_tasks: limit(b.max_total_tasks),
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
            denied: Denials::default(),
            audit_denied: Denials::default(),
            breaker: None,
        };
        let mut denied = [0; REASONS];
        let mut audit = [0; REASONS];
        for c in counters.get(&index, 0)?.iter() {
            t.forks_allowed += c.forks_allowed;
            t.threads_allowed += c.threads_allowed;
            t.migrations_in += c.migrations_in;
            t.migrations_denied += c.migrations_denied;
            t.instances_admitted += c.instances_admitted;
            t.warnings += c.warnings;
            for r in 0..REASONS {
                denied[r] += c.denied[r];
                audit[r] += c.audit_denied[r];
            }
        }
        t.denied = Denials::from(denied);
        t.audit_denied = Denials::from(audit);
        types.push((index, t));
    }

    let now = monotonic_ns();
    let mut list = Vec::new();
    for entry in instances.iter() {
        let (id, s) = entry?;
        let Some((_, t)) = types.iter_mut().find(|(i, _)| *i == s.type_idx) else {
            continue;
        };
        t.processes += s.processes;
        t.threads += s.threads;
        list.push(InstanceStatus {
            id,
            path: names.instance(id),
            type_name: t.name.clone(),
            tasks: spawnguard_ebpf::word_tasks(s.tasks),
            admitted: s.tasks & spawnguard_ebpf::ADMITTED != 0,
            processes: s.processes,
            threads: s.threads,
            age_seconds: now.saturating_sub(s.created_ns) as f64 / 1e9,
        });
    }
    list.sort_by(|a, b| a.path.cmp(&b.path));

    let (mut dropped, mut failed_open) = (0, 0);
    for g in global.get(&0, 0)?.iter() {
        dropped += g.events_dropped;
        failed_open += g.instances_full
            + g.processes_full
            + g.doomed_full
            + g.read_errors
            + g.contended
            + g.kill_failed;
    }
    let hl = host_limits.get(&0, 0)?;
    let host = HostStatus {
        tasks: host_state.get(&0, 0)?.tasks,
        max_tasks: limit(hl.max_tasks),
        deny_tasks: limit(hl.deny_tasks),
    };
    let breakers = crate::breaker::status(None).unwrap_or_default();
    for (_, t) in &mut types {
        t.breaker = breakers.iter().find(|b| b.type_name == t.name).cloned();
    }
    Ok(Status {
        daemon_pid: daemon.as_ref().map(|d| d.pid).filter(|&p| pid_alive(p)),
        backend: daemon.map(|d| d.backend.name().to_owned()),
        host,
        types: types.into_iter().map(|(_, t)| t).collect(),
        instances: list,
        events_dropped: dropped,
        failed_open,
    })
}

fn or_dash(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub fn print_table(s: &Status) {
    match s.daemon_pid {
        Some(pid) => println!(
            "daemon pid {pid}, backend {}",
            s.backend.as_deref().unwrap_or("?")
        ),
        None => println!(
            "daemon not running: the pinned enforcer keeps enforcing its last policy; these \
             figures are read from its maps"
        ),
    }
    match s.host.max_tasks {
        Some(max) => println!(
            "host: {} tasks in instances, budget {max} (denying above {})",
            s.host.tasks,
            or_dash(s.host.deny_tasks)
        ),
        None => println!("host: {} tasks in instances, no host budget", s.host.tasks),
    }
    println!(
        "{:<16} {:<8} {:>11} {:>13} {:>9} {:>8} {:>9} {:>11} {:>8}",
        "TYPE",
        "MODE",
        "INSTANCES",
        "TASKS",
        "PROCESSES",
        "THREADS",
        "MAX_TASKS",
        "MAX_THREADS",
        "DENIED"
    );
    for t in &s.types {
        println!(
            "{:<16} {:<8} {:>11} {:>13} {:>9} {:>8} {:>9} {:>11} {:>8}",
            t.name,
            t.mode,
            format!("{}/{}", t.instances, or_dash(t.max_instances)),
            format!("{}/{}", t.tasks, or_dash(t.max_total_tasks)),
            t.processes,
            t.threads,
            t.max_tasks,
            t.max_threads,
            t.denied.total()
        );
        let d = &t.denied;
        for (r, n) in [
            (0, d.max_tasks),
            (1, d.max_threads),
            (2, d.fork_rate),
            (3, d.max_instances),
            (4, d.max_total_tasks),
            (5, d.host_max_tasks),
            (6, d.max_age),
            (7, d.breaker_open),
        ] {
            if n > 0 {
                println!("  denied by {}: {n}", reason_name(r));
            }
        }
        if let Some(b) = &t.breaker {
            println!("  breaker {}", crate::breaker::describe(b));
        }
    }
    if !s.instances.is_empty() {
        println!();
        println!(
            "{:<40} {:<16} {:>7} {:>9} {:>8} {:>9}",
            "INSTANCE", "TYPE", "TASKS", "PROCESSES", "THREADS", "AGE"
        );
        for i in &s.instances {
            println!(
                "{:<40} {:<16} {:>7} {:>9} {:>8} {:>8.0}s",
                i.path, i.type_name, i.tasks, i.processes, i.threads, i.age_seconds
            );
        }
    }
    if s.events_dropped + s.failed_open > 0 {
        println!(
            "\nevents dropped: {}, tasks let through uncounted (fail-open): {}",
            s.events_dropped, s.failed_open
        );
    }
}
