//! `spawnguard status`: read straight from the pinned maps, so it works whether or not the
//! daemon answers.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use serde::Serialize;
use spawnguard_common::{
    maps, GlobalCounters, InstanceBudget, InstanceState, TypeCounters, MAX_TYPES, MODE_ENFORCE,
    REASONS,
};

use crate::{
    events::{reason_name, Names},
    loader::{DaemonState, PIN_DIR},
};

#[derive(Debug, Serialize)]
pub struct Denials {
    pub max_tasks: u64,
    pub max_threads: u64,
    pub fork_rate: u64,
}

impl Denials {
    fn from(counts: [u64; REASONS]) -> Self {
        Self {
            max_tasks: counts[0],
            max_threads: counts[1],
            fork_rate: counts[2],
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TypeStatus {
    pub name: String,
    pub mode: &'static str,
    pub max_tasks: u64,
    pub max_threads: u64,
    pub instances: u64,
    pub tasks: u64,
    pub processes: u64,
    pub threads: u64,
    pub forks_allowed: u64,
    pub threads_allowed: u64,
    pub migrations_in: u64,
    pub migrations_denied: u64,
    pub denied: Denials,
    pub audit_denied: Denials,
}

#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    /// cgroup id (inode of the instance directory).
    pub id: u64,
    pub path: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub tasks: u64,
    pub processes: u64,
    pub threads: u64,
    pub age_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    /// Pid of the daemon that pinned the maps, if it still runs.
    pub daemon_pid: Option<u32>,
    pub backend: Option<String>,
    pub types: Vec<TypeStatus>,
    pub instances: Vec<InstanceStatus>,
    pub events_dropped: u64,
    pub failed_open: u64,
}

fn open(name: &str) -> Result<Map> {
    let path = Path::new(PIN_DIR).join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned spawnguard state at {} (is `spawnguard run` running?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

fn monotonic_ns() -> u64 {
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
    let budgets: Array<MapData, InstanceBudget> = Array::try_from(open(maps::TYPE_POLICY)?)?;
    let instances: HashMap<MapData, u64, InstanceState> =
        HashMap::try_from(open(maps::INSTANCES)?)?;
    let counters: PerCpuArray<MapData, TypeCounters> =
        PerCpuArray::try_from(open(maps::TYPE_COUNTERS)?)?;
    let global: PerCpuArray<MapData, GlobalCounters> =
        PerCpuArray::try_from(open(maps::GLOBAL_COUNTERS)?)?;
    let daemon = DaemonState::read();
    let mut names = Names::new(daemon.as_ref().map(|d| d.types.clone()).unwrap_or_default());

    let mut types = Vec::new();
    for index in 0..MAX_TYPES {
        let b = budgets.get(&index, 0)?;
        if b.active == 0 {
            continue;
        }
        let end = b.name.iter().position(|&c| c == 0).unwrap_or(b.name.len());
        let mut t = TypeStatus {
            name: String::from_utf8_lossy(&b.name[..end]).into_owned(),
            mode: if b.mode == MODE_ENFORCE {
                "enforce"
            } else {
                "audit"
            },
            max_tasks: b.max_tasks,
            max_threads: b.max_threads,
            instances: 0,
            tasks: 0,
            processes: 0,
            threads: 0,
            forks_allowed: 0,
            threads_allowed: 0,
            migrations_in: 0,
            migrations_denied: 0,
            denied: Denials::from([0; REASONS]),
            audit_denied: Denials::from([0; REASONS]),
        };
        let mut denied = [0; REASONS];
        let mut audit = [0; REASONS];
        for c in counters.get(&index, 0)?.iter() {
            t.forks_allowed += c.forks_allowed;
            t.threads_allowed += c.threads_allowed;
            t.migrations_in += c.migrations_in;
            t.migrations_denied += c.migrations_denied;
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
        t.instances += 1;
        t.tasks += s.tasks;
        t.processes += s.processes;
        t.threads += s.threads;
        list.push(InstanceStatus {
            id,
            path: names.instance(id),
            type_name: t.name.clone(),
            tasks: s.tasks,
            processes: s.processes,
            threads: s.threads,
            age_seconds: now.saturating_sub(s.created_ns) as f64 / 1e9,
        });
    }
    list.sort_by(|a, b| a.path.cmp(&b.path));

    let (mut dropped, mut failed_open) = (0, 0);
    for g in global.get(&0, 0)?.iter() {
        dropped += g.events_dropped;
        failed_open += g.instances_full + g.processes_full + g.doomed_full + g.read_errors;
    }
    Ok(Status {
        daemon_pid: daemon.as_ref().map(|d| d.pid).filter(|&p| pid_alive(p)),
        backend: daemon.map(|d| d.backend.name().to_owned()),
        types: types.into_iter().map(|(_, t)| t).collect(),
        instances: list,
        events_dropped: dropped,
        failed_open,
    })
}

pub fn print_table(s: &Status) {
    match s.daemon_pid {
        Some(pid) => println!(
            "daemon pid {pid}, backend {}",
            s.backend.as_deref().unwrap_or("?")
        ),
        None => println!("daemon not running: read from the pinned maps"),
    }
    println!(
        "{:<16} {:<8} {:>9} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10}",
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
        let denied = t.denied.max_tasks + t.denied.max_threads + t.denied.fork_rate;
        println!(
            "{:<16} {:<8} {:>9} {:>7} {:>9} {:>8} {:>10} {:>10} {:>10}",
            t.name,
            t.mode,
            t.instances,
            t.tasks,
            t.processes,
            t.threads,
            t.max_tasks,
            t.max_threads,
            denied
        );
        for (r, n) in [
            (0, &t.denied.max_tasks),
            (1, &t.denied.max_threads),
            (2, &t.denied.fork_rate),
        ] {
            if *n > 0 {
                println!("  denied by {}: {n}", reason_name(r));
            }
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
