//! The kernel's event stream: read from the ring buffer, described in one readable line each,
//! logged (rate-limited), kept for `spawnguard events` and streamed to its followers.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};
use spawnguard_common::{limit, Backend, BreakerPhase, Cause, Event, EventKind, FailOpen, Reason};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    breaker, cgroupfs,
    host::monotonic_ns,
    loader::{name_of, DaemonState, PlacedType},
};

/// Names for the ids in events: type index to name, instance cgroup id to path.
pub struct Names {
    /// (type index, name, type directory)
    types: Vec<(u32, String, PathBuf)>,
    instances: HashMap<u64, PathBuf>,
    /// The cgroup2 mount, to open a cgroup by its id.
    mount: Option<std::fs::File>,
    /// When the type directories were last listed (only where opening by id is not allowed):
    /// a miss lists them again at most once a second.
    listed: Option<std::time::Instant>,
}

impl Names {
    pub fn new(types: Vec<PlacedType>) -> Self {
        Self {
            types: types
                .into_iter()
                .map(|t| (t.index, t.name, t.dir))
                .collect(),
            instances: HashMap::new(),
            mount: cgroupfs::Cgroup2::discover()
                .ok()
                .and_then(|cg| std::fs::File::open(cg.mount).ok()),
            listed: None,
        }
    }

    /// Names from the pinned maps, for when no daemon runs: type names from the kernel's
    /// policy; instance paths only if a daemon's state file says where its types live.
    pub fn from_maps() -> Result<Self> {
        let mut names = Self::new(DaemonState::read().map(|d| d.types).unwrap_or_default());
        for (index, l) in crate::pinned::types()? {
            if !names.types.iter().any(|t| t.0 == index) {
                names.types.push((index, name_of(&l.name), PathBuf::new()));
            }
        }
        Ok(names)
    }

    pub fn type_name(&self, index: u32) -> &str {
        self.types
            .iter()
            .find(|t| t.0 == index)
            .map_or("?", |t| t.1.as_str())
    }

    /// The instance's directory, looked up on first sight: opened by its id, or (where that is
    /// not allowed) found by listing the type directories.
    pub fn instance(&mut self, id: u64) -> String {
        if let Some(p) = self.instances.get(&id) {
            return p.display().to_string();
        }
        if let Some(path) = self
            .mount
            .as_ref()
            .and_then(|m| cgroupfs::path_of_id(m, id))
        {
            let shown = path.display().to_string();
            self.instances.insert(id, path);
            return shown;
        }
        let stale = self
            .listed
            .is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(1));
        if !self.instances.contains_key(&id) && stale {
            self.listed = Some(std::time::Instant::now());
            for t in &self.types {
                for dir in cgroupfs::children(&t.2) {
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

/// The budget of a denial or a warning, by name.
fn reason_name(reason: Option<Reason>) -> &'static str {
    reason.map_or("unknown", Reason::name)
}

fn text(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn comm(ev: &Event) -> String {
    text(&ev.comm)
}

/// One line per event, for the daemon's log.
pub fn describe(ev: &Event, names: &mut Names) -> String {
    let what = match Cause::from_u32(ev.cause) {
        Some(Cause::Thread) => "new thread",
        Some(Cause::Migration) => "process moving in",
        _ => "new process",
    };
    let instance = names.instance(ev.instance);
    let type_name = names.type_name(ev.type_idx);
    let reason = Reason::from_u32(ev.reason);
    let limit = match reason {
        Some(Reason::ForkRate) => "fork rate bucket empty".to_owned(),
        Some(Reason::BreakerOpen) => {
            format!("breaker of type {type_name} is open")
        }
        Some(Reason::MaxInstances) => format!(
            "type {type_name} at ceiling {}/{}",
            ev.usage.min(ev.limit),
            ev.limit
        ),
        r => format!("{} {}/{}", reason_name(r), ev.usage, ev.limit),
    };
    let Some(kind) = EventKind::from_u32(ev.kind) else {
        return format!("unknown event kind {}", ev.kind);
    };
    match kind {
        EventKind::Denied if ev.target_pid == 0 => format!(
            "denied {what} in {instance} (type {type_name}): {limit}; pid {} ({}) got EAGAIN, \
             no task was created",
            ev.pid,
            comm(ev),
        ),
        EventKind::Denied => {
            let action = match Backend::from_u32(ev.backend) {
                Some(Backend::Kill) => "killed before it ran",
                Some(Backend::KillCompat) => "killed at its first syscall exit",
                _ => "killed",
            };
            format!(
                "denied {what} in {instance} (type {type_name}): {limit}; pid {} ({}), \
                 target pid {} {action}",
                ev.pid,
                comm(ev),
                ev.target_pid
            )
        }
        EventKind::AuditDenied => format!(
            "audit: would deny {what} in {instance} (type {type_name}): {limit}; pid {} ({}), \
             target pid {}",
            ev.pid,
            comm(ev),
            ev.target_pid
        ),
        EventKind::FailClosed => {
            let map = match FailOpen::from_u32(ev.reason) {
                Some(FailOpen::DoomedFull) => "doomed-task",
                _ => "process",
            };
            format!(
                "failed closed: {what} of pid {} ({}) in {instance} (type {type_name}) refused \
                 because the {map} map is full; the instance is counted, so its budget holds",
                ev.pid,
                comm(ev)
            )
        }
        EventKind::FailOpen => {
            let why = match FailOpen::from_u32(ev.reason) {
                Some(FailOpen::InstancesFull) => "the instance map is full",
                Some(FailOpen::ProcessesFull) => "the process map is full",
                Some(FailOpen::DoomedFull) => "the doomed-task map is full",
                Some(FailOpen::Contended) => "other CPUs kept changing the same counters",
                Some(FailOpen::KillFailed) => "the kernel refused to signal it",
                Some(FailOpen::CreatedFull) => {
                    return format!(
                        "{instance} (type {type_name}): its creation time could not be kept \
                         (the map of creation times is full); its max_age counts from its \
                         first task"
                    )
                }
                Some(FailOpen::ReadError) | None => "a kernel structure could not be read",
            };
            format!(
                "failed open: {what} of pid {} ({}) let through uncounted because {why}",
                ev.pid,
                comm(ev)
            )
        }
        EventKind::MaxAge => format!(
            "max age: instance {instance} (type {type_name}) is {}s old, over its max_age of \
             {}s (seen by the kernel at a new task)",
            ev.usage, ev.limit
        ),
        EventKind::Breaker => {
            let (from, to) = (ev.usage >> 8, ev.usage & 0xff);
            let mut line = format!(
                "breaker of type {type_name}: {} -> {} ({})",
                breaker::state_name(from),
                breaker::state_name(to),
                breaker::cause_name(u64::from(ev.reason)),
            );
            let now_ms = monotonic_ns() / 1_000_000;
            if to == BreakerPhase::Open as u64 && ev.limit > now_ms {
                line += &format!(
                    "; next probe in {:.0} s",
                    (ev.limit - now_ms) as f64 / 1000.0
                );
            }
            line
        }
        EventKind::Warn => format!(
            "warning: {} reached {}/{} in {instance} (type {type_name})",
            reason_name(reason),
            ev.usage,
            ev.limit
        ),
        EventKind::Admitted => format!(
            "admitted instance {instance} (type {type_name}): {} instances{}; pid {} ({})",
            ev.usage,
            if ev.limit == spawnguard_common::NO_LIMIT {
                String::new()
            } else {
                format!(" of {}", ev.limit)
            },
            ev.pid,
            comm(ev)
        ),
    }
}

pub fn parse(bytes: &[u8]) -> Option<Event> {
    (bytes.len() >= size_of::<Event>()).then(|| {
        // SAFETY: length checked; Event is plain old data, read unaligned from the ring.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) }
    })
}

/// Version of the JSON lines of `spawnguard events --output json`. Fields are only ever added
/// within a version; a rename or a change of meaning bumps it.
pub const EVENT_SCHEMA: u32 = 1;

/// One kernel event as `spawnguard events --output json` prints it (one JSON object a line).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    /// Always `EVENT_SCHEMA`.
    pub schema: u32,
    /// Wall-clock time of the kernel's decision (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// denied, audit_denied, admitted, warn, breaker, max_age, fail_open, fail_closed; and
    /// `lagged` (a
    /// follower too slow for the stream: `usage` events were skipped for it).
    pub kind: String,
    /// The agent type (absent when the task was not placed in a type).
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    /// The instance cgroup's path, and its id (cgroup inode).
    pub instance: Option<String>,
    pub instance_id: u64,
    /// What the kernel saw: fork (new process), thread, migration, exit.
    pub cause: String,
    /// denied/audit_denied/warn: the budget (max_tasks, fork_rate, ...); fail_open: why;
    /// fail_closed: the full map (processes_full, doomed_full); breaker: what caused the
    /// transition.
    pub reason: Option<String>,
    /// Usage and limit of that budget at the moment of the decision (denied, warn, admitted).
    pub usage: Option<u64>,
    pub limit: Option<u64>,
    /// The task that asked (the forking task, or the process moved in), its name and its
    /// parent's name.
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub parent_comm: String,
    /// The task that was stopped or admitted (the new child, or the process moved in).
    pub target_pid: Option<u32>,
    /// The backend in force: kill or kill-compat.
    pub backend: String,
    /// breaker: the transition.
    pub breaker: Option<BreakerChange>,
    /// The same event as one readable line.
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BreakerChange {
    pub from: String,
    pub to: String,
    /// When an opened breaker lets its next probe through (RFC 3339).
    pub retry_at: Option<String>,
}

/// Wall-clock time of a kernel timestamp (CLOCK_MONOTONIC nanoseconds).
fn wall_time(ts_ns: u64) -> std::time::SystemTime {
    let ago = monotonic_ns().saturating_sub(ts_ns);
    std::time::SystemTime::now() - Duration::from_nanos(ago)
}

/// RFC 3339 time, clamped to the years it can write (1970 to 9999): a kernel timestamp or
/// deadline is any u64.
fn rfc3339(t: std::time::SystemTime) -> String {
    let t = t.clamp(std::time::UNIX_EPOCH, crate::breaker::latest());
    humantime::format_rfc3339_millis(t).to_string()
}

impl EventRecord {
    pub fn from_event(ev: &Event, names: &mut Names) -> Self {
        let placed = ev.instance != 0;
        let message = describe(ev, names);
        let mut r = Self {
            schema: EVENT_SCHEMA,
            time: rfc3339(wall_time(ev.ts_ns)),
            kind: EventKind::from_u32(ev.kind)
                .map_or("unknown", EventKind::name)
                .to_owned(),
            type_name: placed.then(|| names.type_name(ev.type_idx).to_owned()),
            instance: placed.then(|| names.instance(ev.instance)),
            instance_id: ev.instance,
            cause: Cause::from_u32(ev.cause)
                .map_or("unknown", Cause::name)
                .to_owned(),
            reason: None,
            usage: None,
            limit: None,
            pid: ev.pid,
            tgid: ev.tgid,
            comm: comm(ev),
            parent_comm: text(&ev.parent_comm),
            target_pid: (ev.target_pid != 0).then_some(ev.target_pid),
            backend: Backend::from_u32(ev.backend)
                .unwrap_or(Backend::KillCompat)
                .name()
                .to_owned(),
            breaker: None,
            message,
        };
        match EventKind::from_u32(ev.kind) {
            Some(EventKind::Denied | EventKind::AuditDenied | EventKind::Warn) => {
                let reason = Reason::from_u32(ev.reason);
                r.reason = Some(reason_name(reason).to_owned());
                if !matches!(
                    reason,
                    Some(Reason::ForkRate | Reason::MaxAge | Reason::BreakerOpen)
                ) {
                    r.usage = Some(ev.usage);
                    r.limit = limit(ev.limit);
                }
            }
            Some(EventKind::Admitted) => {
                r.usage = Some(ev.usage);
                r.limit = limit(ev.limit);
            }
            Some(EventKind::MaxAge) => {
                r.reason = Some(Reason::MaxAge.name().into());
                r.usage = Some(ev.usage);
                r.limit = Some(ev.limit);
            }
            Some(EventKind::FailOpen | EventKind::FailClosed) => {
                // An unknown code reads as the catch-all.
                let why = FailOpen::from_u32(ev.reason).unwrap_or(FailOpen::ReadError);
                r.reason = Some(why.name().to_owned());
            }
            Some(EventKind::Breaker) => {
                let (from, to) = (ev.usage >> 8, ev.usage & 0xff);
                r.reason = Some(breaker::cause_name(u64::from(ev.reason)).to_owned());
                let retry_at = (to == BreakerPhase::Open as u64).then(|| {
                    let now_ms = monotonic_ns() / 1_000_000;
                    let wait = Duration::from_millis(ev.limit.saturating_sub(now_ms));
                    rfc3339(crate::breaker::after(wait))
                });
                r.breaker = Some(BreakerChange {
                    from: breaker::state_name(from).to_owned(),
                    to: breaker::state_name(to).to_owned(),
                    retry_at,
                });
            }
            None => {}
        }
        r
    }

    /// An event the daemon made itself (cause `timer` or `manual`), not the kernel.
    pub fn from_daemon(kind: &str, cause: &str, type_name: Option<&str>, message: String) -> Self {
        Self {
            schema: EVENT_SCHEMA,
            time: rfc3339(std::time::SystemTime::now()),
            kind: kind.into(),
            type_name: type_name.map(str::to_owned),
            instance: None,
            instance_id: 0,
            cause: cause.into(),
            reason: None,
            usage: None,
            limit: None,
            pid: std::process::id(),
            tgid: std::process::id(),
            comm: "spawnguard".into(),
            parent_comm: String::new(),
            target_pid: None,
            backend: String::new(),
            breaker: None,
            message,
        }
    }

    /// A record for a follower that fell behind: `missed` events were skipped for it.
    pub fn lagged(missed: u64) -> Self {
        Self {
            usage: Some(missed),
            pid: 0,
            tgid: 0,
            comm: String::new(),
            ..Self::from_daemon(
                "lagged",
                "",
                None,
                format!("{missed} events skipped: this reader was too slow"),
            )
        }
    }
}

/// Log lines per (type, kind, reason) and window before the rest are only counted.
const LOG_BURST: u32 = 5;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Keeps a bomb from flooding the journal: per (type, kind, reason), the first `burst` events
/// of a window are logged, the rest counted and summed up in one line when the window ends.
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    slots: HashMap<(u32, u32, u32), LogSlot>,
}

struct LogSlot {
    start: Instant,
    logged: u32,
    suppressed: u64,
    what: String,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            slots: HashMap::new(),
        }
    }

    /// Whether to log this event; returns first the summary of the key's ended window, if any.
    pub fn admit(
        &mut self,
        key: (u32, u32, u32),
        what: impl FnOnce() -> String,
        now: Instant,
    ) -> (Option<String>, bool) {
        let window = self.window;
        let slot = self.slots.entry(key).or_insert_with(|| LogSlot {
            start: now,
            logged: 0,
            suppressed: 0,
            what: what(),
        });
        let mut summary = None;
        if now.duration_since(slot.start) >= window {
            summary = slot.summary(window);
            slot.start = now;
            slot.logged = 0;
        }
        if slot.logged < self.burst {
            slot.logged += 1;
            (summary, true)
        } else {
            slot.suppressed += 1;
            (summary, false)
        }
    }

    /// Summaries of windows that ended with events left unlogged (call it now and then, so a
    /// bomb that stopped still gets its summary).
    pub fn flush(&mut self, now: Instant) -> Vec<String> {
        let window = self.window;
        let mut out = Vec::new();
        self.slots.retain(|_, slot| {
            if now.duration_since(slot.start) < window {
                return true;
            }
            out.extend(slot.summary(window));
            false
        });
        out
    }
}

impl LogSlot {
    fn summary(&mut self, window: Duration) -> Option<String> {
        let n = std::mem::take(&mut self.suppressed);
        (n > 0).then(|| {
            format!(
                "suppressed {n} more {} in the last {}",
                self.what,
                humantime::format_duration(window)
            )
        })
    }
}

/// Events kept for `spawnguard events` without `--follow`.
const HISTORY: usize = 1000;

/// What a new reader of the stream gets: the recent events, and the live ones from then on.
pub type Subscription = (Vec<Arc<EventRecord>>, broadcast::Receiver<Arc<EventRecord>>);

/// Owns the ring buffer until it goes away: logs every event (rate-limited), keeps the recent
/// ones and streams them to followers, with the events the daemon makes itself
/// (`from_daemon`). `types` follows the policy in force. Beats `alive` on every turn, and turns
/// at least every `notify::BEAT` (the watchdog's proof that the ring is read).
pub async fn run(
    ring: RingBuf<MapData>,
    mut types: tokio::sync::watch::Receiver<Vec<PlacedType>>,
    mut subscribe: mpsc::Receiver<oneshot::Sender<Subscription>>,
    mut from_daemon: mpsc::Receiver<EventRecord>,
    alive: crate::notify::Heartbeat,
) -> Result<()> {
    let mut names = Names::new(types.borrow_and_update().clone());
    let mut limiter = LogLimiter::new(LOG_BURST, LOG_WINDOW);
    let mut history: VecDeque<Arc<EventRecord>> = VecDeque::with_capacity(HISTORY);
    let (live, _) = broadcast::channel::<Arc<EventRecord>>(4096);
    let mut tick = tokio::time::interval(LOG_WINDOW);
    let mut beat = tokio::time::interval(crate::notify::BEAT);
    // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long as the
    // AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    loop {
        alive.beat();
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                if types.has_changed().unwrap_or(false) {
                    names = Names::new(types.borrow_and_update().clone());
                }
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let Some(ev) = parse(&item) else { continue };
                    let record = Arc::new(EventRecord::from_event(&ev, &mut names));
                    log(&mut limiter, &ev, &record);
                    if history.len() == HISTORY {
                        history.pop_front();
                    }
                    history.push_back(record.clone());
                    let _ = live.send(record);
                }
                guard.clear_ready();
            }
            // Events the daemon made (max-age actions, breaker commands): already logged.
            Some(record) = from_daemon.recv() => {
                let record = Arc::new(record);
                if history.len() == HISTORY {
                    history.pop_front();
                }
                history.push_back(record.clone());
                let _ = live.send(record);
            }
            Some(reply) = subscribe.recv() => {
                let _ = reply.send((history.iter().cloned().collect(), live.subscribe()));
            }
            _ = tick.tick() => {
                for line in limiter.flush(Instant::now()) {
                    tracing::warn!("{line}");
                }
            }
            _ = beat.tick() => {}
        }
    }
}

/// `spawnguard events` with no daemon: reads the pinned ring buffer itself. (What it reads is
/// gone from the ring: a daemon started later does not see it.)
pub fn read_pinned(
    follow: bool,
    type_name: Option<&str>,
    mut each: impl FnMut(EventRecord) -> Result<()>,
) -> Result<()> {
    let mut ring = crate::pinned::events()?;
    let mut names = Names::from_maps()?;
    loop {
        while let Some(item) = ring.next() {
            let Some(ev) = parse(&item) else { continue };
            let r = EventRecord::from_event(&ev, &mut names);
            if type_name.is_none() || r.type_name.as_deref() == type_name {
                each(r)?;
            }
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn log(limiter: &mut LogLimiter, ev: &Event, record: &EventRecord) {
    let key = (ev.type_idx, ev.kind, ev.reason);
    let what = || {
        format!(
            "{} events of type {} ({})",
            record.kind,
            record.type_name.as_deref().unwrap_or("-"),
            record.reason.as_deref().unwrap_or("-")
        )
    };
    let (summary, now) = limiter.admit(key, what, Instant::now());
    if let Some(line) = summary {
        tracing::warn!("{line}");
    }
    if !now {
        return;
    }
    let line = &record.message;
    match EventKind::from_u32(ev.kind) {
        Some(EventKind::FailOpen) => tracing::error!("{line}"),
        Some(EventKind::Denied | EventKind::Warn | EventKind::Breaker) => tracing::warn!("{line}"),
        _ => tracing::info!("{line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz finding (events target): a breaker event whose deadline (`limit`, ms) lies past
    /// year 9999 made the RFC 3339 formatting fail (a panic in `to_string`); it is clamped.
    #[test]
    fn a_deadline_past_year_9999_is_clamped() {
        let bytes = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds/events/regression-deadline-past-year-9999.bin"),
        )
        .unwrap();
        let ev = parse(&bytes).unwrap();
        assert_eq!(ev.kind, EventKind::Breaker as u32);
        let r = EventRecord::from_event(&ev, &mut Names::new(Vec::new()));
        let retry_at = r.breaker.unwrap().retry_at.unwrap();
        assert!(retry_at.starts_with("9999-12-31T23:59:59"), "{retry_at}");
        let far = Event {
            kind: EventKind::Breaker as u32,
            usage: BreakerPhase::Open as u64,
            limit: u64::MAX,
            ts_ns: u64::MAX,
            ..Default::default()
        };
        let r = EventRecord::from_event(&far, &mut Names::new(Vec::new()));
        assert!(
            r.time.starts_with("19") || r.time.starts_with("20"),
            "{}",
            r.time
        );
    }
    use spawnguard_common::{BACKEND_KILL, CAUSE_FORK, EVENT_DENIED, REASON_MAX_TASKS};

    #[test]
    fn a_burst_is_logged_then_counted_and_summed_up_once() {
        let mut l = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let key = (1, EVENT_DENIED, 0);
        let logged: Vec<bool> = (0..100)
            .map(|i| {
                let (summary, log) =
                    l.admit(key, || "denials".into(), t0 + Duration::from_millis(i));
                assert!(summary.is_none());
                log
            })
            .collect();
        assert_eq!(logged.iter().filter(|&&x| x).count(), 3);
        assert!(logged[..3].iter().all(|&x| x));
        // Another key has its own budget.
        assert!(l.admit((2, EVENT_DENIED, 0), || "other".into(), t0).1);
        // The next window starts with the summary of the last one.
        let (summary, log) = l.admit(key, || unreachable!(), t0 + Duration::from_secs(11));
        assert_eq!(
            summary.as_deref(),
            Some("suppressed 97 more denials in the last 10s")
        );
        assert!(log);
        // A quiet key's summary comes from flush, once.
        for i in 0..10 {
            l.admit(
                key,
                || unreachable!(),
                t0 + Duration::from_secs(11) + Duration::from_millis(i),
            );
        }
        let lines = l.flush(t0 + Duration::from_secs(30));
        assert_eq!(
            lines,
            vec!["suppressed 8 more denials in the last 10s".to_owned()]
        );
        assert!(l.flush(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_denial_becomes_a_versioned_json_line_with_usage_and_limit() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"sg-bomb");
        let mut parent = [0u8; 16];
        parent[..4].copy_from_slice(b"bash");
        let ev = Event {
            ts_ns: monotonic_ns(),
            instance: 42,
            usage: 40,
            limit: 40,
            kind: EVENT_DENIED,
            reason: REASON_MAX_TASKS,
            cause: CAUSE_FORK,
            type_idx: 0,
            pid: 7,
            tgid: 7,
            target_pid: 8,
            backend: BACKEND_KILL,
            comm,
            parent_comm: parent,
        };
        let r = EventRecord::from_event(&ev, &mut Names::new(vec![]));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["kind"], "denied");
        assert_eq!(v["reason"], "max_tasks");
        assert_eq!(v["usage"], 40);
        assert_eq!(v["limit"], 40);
        assert_eq!(v["comm"], "sg-bomb");
        assert_eq!(v["parent_comm"], "bash");
        assert_eq!(v["target_pid"], 8);
        assert_eq!(v["cause"], "fork");
        assert_eq!(v["instance"], "cgroup id 42");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_refusal_for_a_full_map_names_the_map() {
        let ev = Event {
            ts_ns: monotonic_ns(),
            instance: 42,
            kind: spawnguard_common::EVENT_FAIL_CLOSED,
            reason: spawnguard_common::FAIL_PROCESSES_FULL,
            cause: CAUSE_FORK,
            pid: 7,
            tgid: 7,
            target_pid: 8,
            backend: BACKEND_KILL,
            ..Event::default()
        };
        let r = EventRecord::from_event(&ev, &mut Names::new(vec![]));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "fail_closed");
        assert_eq!(v["reason"], "processes_full");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.starts_with("failed closed: ")
                && m.contains(" refused because the process map is full;"),
            "{m}"
        );
    }
}
