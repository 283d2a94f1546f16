//! `gate`: would a new instance of a type be admitted now, and if not, why. For agent runtimes
//! to ask before they spawn: in process through this library (no process start), or with
//! `spawnguard gate TYPE`. Root reads the pinned maps; anyone else asks the daemon's read-only
//! gate socket (`run --gate-group GROUP` opens it to a group). The answer comes from the
//! kernel's own decision code, run on copies of the counts.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use aya::maps::{Array, MapData};
use spawnguard_common::{
    BreakerLimits, BreakerState, HostLimits, HostState, TypeLimits, TypeState, MAX_TYPES,
};
use spawnguard_ebpf::{
    breaker_gate, policy_index, preview_new_instance, AtomicU64, Budget, Refusal, SharedUsage,
};

use crate::{
    breaker::{now_ms, wall_clock_in},
    host,
    loader::{name_of, other_layouts, pin_dir, PIN_ROOT},
    pinned,
};

/// The daemon's read-only gate socket: one line in (a type name), one line out.
pub const SOCKET: &str = "/run/spawnguard/gate.sock";

/// The longest request line the gate socket reads (a type name is at most 32 bytes).
const MAX_REQUEST: u64 = 256;

/// What a new instance of a type would meet now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// Refused, with one line saying why.
    Refused(String),
}

/// Why the gate cannot tell (`spawnguard gate` exits 2).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(
        "no spawnguard enforcer is installed ({0} is missing): start one with `spawnguard run`"
    )]
    NotInstalled(PathBuf),
    #[error(
        "{PIN_ROOT}/{0} holds an enforcer of another map layout, which this spawnguard cannot \
         read: use the spawnguard that installed it, or migrate (see `spawnguard run`)"
    )]
    OtherLayout(String),
    #[error("no type {0:?} in the policy in force")]
    UnknownType(String),
    #[error(
        "not root, and the daemon's gate socket {SOCKET} does not answer ({0}): the daemon \
         opens it to a group with `spawnguard run --gate-group GROUP`"
    )]
    NoGateSocket(std::io::Error),
    #[error("the daemon's gate socket: {0}")]
    Socket(String),
    #[error("reading the pinned maps: {0:#}")]
    Maps(#[from] anyhow::Error),
}

/// Would a new instance of `type_name` be admitted now? As root, from the pinned maps;
/// otherwise through the daemon's gate socket.
pub fn check(type_name: &str) -> Result<Verdict, GateError> {
    if host::is_root() {
        check_pinned(type_name)
    } else {
        ask_socket(type_name)
    }
}

/// `check`, from the pinned maps (root). Opens them for this one check: a runtime that asks
/// often keeps a `PinnedGate` instead.
pub fn check_pinned(type_name: &str) -> Result<Verdict, GateError> {
    PinnedGate::open()?.check(type_name)
}

/// The maps a gate check reads, opened once (root). Valid while the enforcer it was opened on
/// stays installed: after `spawnguard uninstall`, open a new one.
pub struct PinnedGate {
    side: Array<MapData, u32>,
    type_policy: Array<MapData, TypeLimits>,
    type_state: Array<MapData, TypeState>,
    host_limits: Array<MapData, HostLimits>,
    host_state: Array<MapData, HostState>,
    breaker_limits: Array<MapData, BreakerLimits>,
    breaker_state: Array<MapData, BreakerState>,
}

impl PinnedGate {
    pub fn open() -> Result<Self, GateError> {
        let dir = pin_dir();
        if !dir.exists() {
            return Err(match other_layouts().into_iter().next() {
                Some(other) => GateError::OtherLayout(other),
                None => GateError::NotInstalled(dir),
            });
        }
        Ok(Self {
            side: pinned::policy_side_map()?,
            type_policy: pinned::type_policy()?,
            type_state: pinned::type_state()?,
            host_limits: pinned::host_limits()?,
            host_state: pinned::host_state()?,
            breaker_limits: pinned::breaker_limits()?,
            breaker_state: pinned::breaker_state()?,
        })
    }

    /// Would a new instance of `type_name` be admitted now?
    pub fn check(&self, type_name: &str) -> Result<Verdict, GateError> {
        let side = self.side.get(&0, 0).map_err(anyhow::Error::from)? & 1;
        let index = (0..MAX_TYPES)
            .find(|&i| {
                self.type_policy
                    .get(&policy_index(side, i), 0)
                    .is_ok_and(|l| l.active != 0 && name_of(&l.name) == type_name)
            })
            .ok_or_else(|| GateError::UnknownType(type_name.to_owned()))?;
        Ok(match self.why_not(side, index)? {
            None => Verdict::Admitted,
            Some(why) => Verdict::Refused(why),
        })
    }
}

/// `check`, through the daemon's gate socket (what `check` does when not root).
pub fn ask_socket(type_name: &str) -> Result<Verdict, GateError> {
    let mut stream = UnixStream::connect(SOCKET).map_err(GateError::NoGateSocket)?;
    let io = |e: std::io::Error| GateError::Socket(e.to_string());
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    stream
        .write_all(format!("{type_name}\n").as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream.take(4096))
        .read_line(&mut line)
        .map_err(io)?;
    parse_answer(line.trim_end())
}

/// The gate socket's answer line for a request line.
pub fn answer(request: &str) -> String {
    match check_pinned(request.trim()) {
        Ok(Verdict::Admitted) => "ok".to_owned(),
        Ok(Verdict::Refused(why)) => format!("no: {why}"),
        Err(GateError::UnknownType(t)) => format!("unknown-type: {t}"),
        Err(e) => format!("error: {e}"),
    }
}

fn parse_answer(line: &str) -> Result<Verdict, GateError> {
    if line == "ok" {
        return Ok(Verdict::Admitted);
    }
    if let Some(why) = line.strip_prefix("no: ") {
        return Ok(Verdict::Refused(why.to_owned()));
    }
    if let Some(t) = line.strip_prefix("unknown-type: ") {
        return Err(GateError::UnknownType(t.to_owned()));
    }
    Err(GateError::Socket(
        line.strip_prefix("error: ").unwrap_or(line).to_owned(),
    ))
}

/// Creates the gate socket: root-only (0600), or open to `group` (0660, that group), which
/// may then ask the gate and nothing else.
pub fn bind(group: Option<&str>) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let gid = group.map(group_id).transpose()?;
    let _ = std::fs::remove_file(SOCKET);
    // SAFETY: umask only changes this process's file creation mask; restored right after.
    let old = unsafe { libc::umask(0o077) };
    let listener = tokio::net::UnixListener::bind(SOCKET);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {SOCKET}"))?;
    let mode = match gid {
        Some(gid) => {
            std::os::unix::fs::chown(SOCKET, Some(0), Some(gid))
                .with_context(|| format!("chown root:{gid} {SOCKET}"))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(SOCKET, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {SOCKET}"))?;
    Ok(listener)
}

/// A group's id, by name or number.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)?;
    // SAFETY: getgrnam reads a NUL-terminated name; the entry's gid is copied out at once
    // (before any other call could reuse its static buffer).
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        anyhow::bail!("--gate-group {group:?}: no such group");
    }
    // SAFETY: non-null entry returned by getgrnam, read at once.
    Ok(unsafe { (*entry).gr_gid })
}

/// Serves the gate socket until the daemon stops. Read-only: it only ever reads the pinned
/// maps, so it may be opened to a group of unprivileged runtimes.
pub async fn serve(listener: tokio::net::UnixListener) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::BufReader::new((&mut stream).take(MAX_REQUEST)).read_line(&mut line),
            )
            .await;
            if matches!(read, Ok(Ok(n)) if n > 0) {
                // A few map reads: microseconds, no need to leave the runtime's thread.
                let reply = answer(&line);
                let _ = stream.write_all(format!("{reply}\n").as_bytes()).await;
            }
        });
    }
}

impl PinnedGate {
    /// Why a new instance of the type `index` would not be admitted now (`None`: it would be).
    /// Reads the pinned maps only; never changes anything (it does not claim the half-open
    /// probe).
    fn why_not(&self, side: u32, index: u32) -> anyhow::Result<Option<String>> {
        let maps = GateMaps {
            breaker_limits: self.breaker_limits.get(&policy_index(side, index), 0)?,
            breaker_state: self.breaker_state.get(&index, 0)?,
            type_limits: self.type_policy.get(&policy_index(side, index), 0)?,
            type_state: self.type_state.get(&index, 0)?,
            host_limits: self.host_limits.get(&side, 0)?,
            host_state: self.host_state.get(&0, 0)?,
        };
        Ok(why_not(&maps, now_ms()))
    }
}

/// The map values a gate check reads for one type (copies: the check never writes).
#[derive(Clone, Copy, Debug, Default)]
pub struct GateMaps {
    pub breaker_limits: BreakerLimits,
    pub breaker_state: BreakerState,
    pub type_limits: TypeLimits,
    pub type_state: TypeState,
    pub host_limits: HostLimits,
    pub host_state: HostState,
}

/// Why a new instance would not be admitted with these map values at `now` (ms of the
/// breaker's clock); `None`: it would be. Any values: a map is read as it is.
pub fn why_not(m: &GateMaps, now: u64) -> Option<String> {
    let p = &m.breaker_limits;
    if p.enabled != 0 {
        let word = AtomicU64::new(m.breaker_state.word);
        // On a copy: the real probe is claimed by the kernel when the instance starts.
        if let (spawnguard_ebpf::Gate::Refused { until_ms, probing }, _) =
            breaker_gate(&word, now, p)
        {
            // A word read from the map may hold any deadline, even a past one.
            let left = until_ms.saturating_sub(now);
            let wait = left as f64 / 1000.0;
            let at = wall_clock_in(Duration::from_millis(left));
            return Some(if probing {
                format!("breaker half-open: its probe instance runs until {at} (in {wait:.0} s)")
            } else {
                format!("breaker open until {at} (in {wait:.0} s)")
            });
        }
    }
    let (l, t, h) = (&m.type_limits, &m.type_state, &m.host_limits);
    let used = m.host_state.tasks;
    let usage = SharedUsage {
        type_instances: t.instances,
        type_tasks: t.tasks,
        host_tasks: used,
    };
    // The kernel's own admission decides, on copies of the totals.
    match preview_new_instance(&Budget::of(l, h), &usage) {
        None => None,
        Some(Refusal::MaxInstances) => Some(format!("ceiling {}/{}", t.instances, l.max_instances)),
        Some(Refusal::TypeTasks) => Some(format!(
            "type at max_total_tasks {}/{}",
            t.tasks, l.max_total_tasks
        )),
        Some(Refusal::HostTasks) => Some(format!(
            "host at {:.0} % of its budget ({used}/{}; denying above {})",
            used as f64 * 100.0 / h.max_tasks as f64,
            h.max_tasks,
            h.deny_tasks
        )),
        Some(Refusal::MaxTasks) => Some(format!(
            "max_tasks {} leaves no room for a first task",
            l.max_tasks
        )),
        Some(other) => Some(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate's decoder takes any map values: a breaker word whose deadline is past `now`
    /// by any amount, or before it, answers without a panic (an overflow in the subtraction
    /// or in the wall clock was the risk the maps fuzz target covers).
    #[test]
    fn any_breaker_deadline_answers() {
        for word in [0, 1, u64::MAX, u64::MAX >> 1, 1 << 63] {
            for now in [0, 1_000, u64::MAX] {
                let m = GateMaps {
                    breaker_limits: BreakerLimits {
                        enabled: 1,
                        ..Default::default()
                    },
                    breaker_state: BreakerState {
                        word,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let _ = why_not(&m, now);
            }
        }
    }

    #[test]
    fn the_socket_s_answers_read_back_as_they_were_given() {
        assert_eq!(parse_answer("ok").unwrap(), Verdict::Admitted);
        assert_eq!(
            parse_answer("no: ceiling 3/3").unwrap(),
            Verdict::Refused("ceiling 3/3".into())
        );
        assert!(matches!(
            parse_answer("unknown-type: x"),
            Err(GateError::UnknownType(t)) if t == "x"
        ));
        assert!(matches!(parse_answer("error: boom"), Err(GateError::Socket(m)) if m == "boom"));
        assert!(matches!(parse_answer(""), Err(GateError::Socket(_))));
    }
}
