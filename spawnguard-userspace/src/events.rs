//! The kernel's event stream: read from the ring buffer, described in one readable line each.

use std::{collections::HashMap, path::PathBuf};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use spawnguard_common::{
    Event, BACKEND_KILL, CAUSE_MIGRATION, CAUSE_THREAD, EVENT_AUDIT_DENIED, EVENT_DENIED,
    EVENT_FAIL_OPEN, EVENT_MAX_AGE, EVENT_WARN, FAIL_CONTENDED, FAIL_DOOMED_FULL,
    FAIL_INSTANCES_FULL, FAIL_PROCESSES_FULL, REASON_FORK_RATE, REASON_HOST_TASKS, REASON_MAX_AGE,
    REASON_MAX_INSTANCES, REASON_MAX_TASKS, REASON_MAX_THREADS, REASON_TYPE_TASKS,
};
use tokio::io::unix::AsyncFd;

use crate::{cgroupfs, loader::PlacedType};

/// Names for the ids in events: type index to name, instance cgroup id to path.
pub struct Names {
    types: Vec<PlacedType>,
    instances: HashMap<u64, PathBuf>,
}

impl Names {
    pub fn new(types: Vec<PlacedType>) -> Self {
        Self {
            types,
            instances: HashMap::new(),
        }
    }

    pub fn type_name(&self, index: u32) -> &str {
        self.types
            .iter()
            .find(|t| t.index == index)
            .map_or("?", |t| t.name.as_str())
    }

    /// The instance's directory (relative to its type's parent), looked up on first sight.
    pub fn instance(&mut self, id: u64) -> String {
        if !self.instances.contains_key(&id) {
            for t in &self.types {
                for dir in cgroupfs::children(&t.dir) {
                    if let Ok(child) = cgroupfs::cgroup_id(&dir) {
                        self.instances.insert(child, dir);
                    }
                }
            }
        }
        match self.instances.get(&id) {
            Some(p) => p.display().to_string(),
            None => format!("cgroup id {id}"),
        }
    }
}

pub fn reason_name(reason: u32) -> &'static str {
    match reason {
        REASON_MAX_TASKS => "max_tasks",
        REASON_MAX_THREADS => "max_threads",
        REASON_FORK_RATE => "fork_rate",
        REASON_MAX_INSTANCES => "max_instances",
        REASON_TYPE_TASKS => "max_total_tasks",
        REASON_HOST_TASKS => "host_max_tasks",
        REASON_MAX_AGE => "max_age",
        spawnguard_common::REASON_BREAKER_OPEN => "breaker_open",
        _ => "unknown",
    }
}

fn comm(ev: &Event) -> String {
    let end = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    String::from_utf8_lossy(&ev.comm[..end]).into_owned()
}

/// One line per event, for the daemon's log.
pub fn describe(ev: &Event, names: &mut Names) -> String {
    let what = match ev.cause {
        CAUSE_THREAD => "new thread",
        CAUSE_MIGRATION => "process moving in",
        _ => "new process",
    };
    let instance = names.instance(ev.instance);
    let type_name = names.type_name(ev.type_idx);
    let limit = match ev.reason {
        REASON_FORK_RATE => "fork rate bucket empty".to_owned(),
        spawnguard_common::REASON_BREAKER_OPEN => {
            format!("breaker of type {type_name} is open")
        }
        REASON_MAX_INSTANCES => format!(
            "type {type_name} at ceiling {}/{}",
            ev.usage.min(ev.limit),
            ev.limit
        ),
        r => format!("{} {}/{}", reason_name(r), ev.usage, ev.limit),
    };
    match ev.kind {
        EVENT_DENIED => {
            let action = if ev.backend == BACKEND_KILL {
                "killed before it ran"
            } else {
                "killed at its first syscall exit"
            };
            format!(
                "denied {what} in {instance} (type {type_name}): {limit}; pid {} ({}), \
                 target pid {} {action}",
                ev.pid,
                comm(ev),
                ev.target_pid
            )
        }
        EVENT_AUDIT_DENIED => format!(
            "audit: would deny {what} in {instance} (type {type_name}): {limit}; pid {} ({}), \
             target pid {}",
            ev.pid,
            comm(ev),
            ev.target_pid
        ),
        EVENT_FAIL_OPEN => {
            let why = match ev.reason {
                FAIL_INSTANCES_FULL => "the instance map is full",
                FAIL_PROCESSES_FULL => "the process map is full",
                FAIL_DOOMED_FULL => "the doomed-task map is full",
                FAIL_CONTENDED => "other CPUs kept changing the same counters",
                spawnguard_common::FAIL_KILL => "the kernel refused to signal it",
                _ => "a kernel structure could not be read",
            };
            format!(
                "failed open: {what} of pid {} ({}) let through uncounted because {why}",
                ev.pid,
                comm(ev)
            )
        }
        EVENT_MAX_AGE => format!(
            "max age: instance {instance} (type {type_name}) is {}s old, over its max_age of \
             {}s (seen by the kernel at a new task)",
            ev.usage, ev.limit
        ),
        spawnguard_common::EVENT_BREAKER => {
            let (from, to) = (ev.usage >> 8, ev.usage & 0xff);
            let mut line = format!(
                "breaker of type {type_name}: {} -> {} ({})",
                crate::breaker::state_name(from),
                crate::breaker::state_name(to),
                crate::breaker::cause_name(u64::from(ev.reason)),
            );
            let now_ms = crate::status::monotonic_ns() / 1_000_000;
            if to == spawnguard_ebpf::BREAKER_OPEN && ev.limit > now_ms {
                line += &format!(
                    "; next probe in {:.0} s",
                    (ev.limit - now_ms) as f64 / 1000.0
                );
            }
            line
        }
        EVENT_WARN => format!(
            "warning: {} reached {}/{} in {instance} (type {type_name})",
            reason_name(ev.reason),
            ev.usage,
            ev.limit
        ),
        k => format!("unknown event kind {k}"),
    }
}

pub fn parse(bytes: &[u8]) -> Option<Event> {
    (bytes.len() >= size_of::<Event>()).then(|| {
        // SAFETY: length checked; Event is plain old data, read unaligned from the ring.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) }
    })
}

/// Logs every event until the ring buffer goes away. Owns the ring buffer; `types` follows the
/// policy in force.
pub async fn log_events(
    ring: RingBuf<MapData>,
    mut types: tokio::sync::watch::Receiver<Vec<PlacedType>>,
) -> Result<()> {
    let mut names = Names::new(types.borrow_and_update().clone());
    // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long as the
    // AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        if types.has_changed().unwrap_or(false) {
            names = Names::new(types.borrow_and_update().clone());
        }
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(ev) = parse(&item) else { continue };
            let line = describe(&ev, &mut names);
            match ev.kind {
                EVENT_FAIL_OPEN => tracing::error!("{line}"),
                EVENT_DENIED | EVENT_WARN | spawnguard_common::EVENT_BREAKER => {
                    tracing::warn!("{line}")
                }
                _ => tracing::info!("{line}"),
            }
        }
        guard.clear_ready();
    }
}
