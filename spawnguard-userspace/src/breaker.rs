//! The per-type circuit breakers, from userspace: read, opened, closed and fed failures through
//! the pinned maps (so it all works with the daemon down), and the pre-spawn `gate`. The kernel
//! makes the same transitions with the same functions (spawnguard-ebpf's library).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use spawnguard_common::{BreakerLimits, BreakerPhase, BreakerState};
use spawnguard_ebpf::{
    breaker_instance_ended, breaker_state, breaker_step, breaker_until, breaker_word, open_for,
    policy_index, AtomicU64, Cause, Transition, BREAKER_CLOSED, BREAKER_OPEN, BREAKER_PROBING,
};

use crate::{host::monotonic_ns, loader::name_of, pinned};

/// Slot of the type named `name` in the policy in force.
fn type_index(name: &str) -> Result<u32> {
    match find_type(name)? {
        Some(index) => Ok(index),
        None => bail!("no type {name:?} in the policy in force"),
    }
}

/// Slot of the type named `name` in the policy in force, if it has one.
pub(crate) fn find_type(name: &str) -> Result<Option<u32>> {
    Ok(pinned::types()?
        .into_iter()
        .find(|(_, l)| name_of(&l.name) == name)
        .map(|(index, _)| index))
}

/// A breaker state (`BREAKER_*`, as the word and events hold it) by name.
pub fn state_name(state: u64) -> &'static str {
    u32::try_from(state)
        .ok()
        .and_then(BreakerPhase::from_u32)
        .map_or("unknown", BreakerPhase::name)
}

/// Why a breaker changed state (as `last_cause` and events hold it), by name.
pub fn cause_name(cause: u64) -> &'static str {
    u32::try_from(cause)
        .ok()
        .and_then(Cause::from_u32)
        .map_or("-", Cause::name)
}

/// A breaker as `status` and `breaker status` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BreakerView {
    #[serde(rename = "type")]
    pub type_name: String,
    /// "closed", "open" or "half-open" (half-open: the open time is over; the next new
    /// instance is the probe, or a probe is running).
    pub state: String,
    pub step: u64,
    /// Seconds until the open time ends (open) or the probe's start-up window ends (probing).
    pub retry_in_seconds: Option<f64>,
    pub trips: u64,
    pub last_cause: String,
    pub seconds_since_last_change: Option<f64>,
    /// Unix time at which the breaker opened, while it is open (also once its open time is
    /// over and it waits for a probe).
    #[serde(default)]
    pub open_since_unix_seconds: Option<f64>,
    /// How long the current opening lasts (its deadline less the time it opened), while it is
    /// open: what an alert compares the time since `open_since_unix_seconds` with.
    #[serde(default)]
    pub open_for_seconds: Option<f64>,
}

/// A breaker's state word and record as `status` and `breaker` show them (any values).
pub fn view(type_name: &str, s: &BreakerState, now_ms: u64) -> BreakerView {
    let w = s.word;
    let until = breaker_until(w);
    let mut state = breaker_state(w);
    if state == BREAKER_OPEN && now_ms >= until {
        state = BREAKER_PROBING;
    }
    BreakerView {
        type_name: type_name.to_owned(),
        state: state_name(state).to_owned(),
        step: breaker_step(w),
        retry_in_seconds: (breaker_state(w) != BREAKER_CLOSED && until > now_ms)
            .then(|| (until - now_ms) as f64 / 1000.0),
        trips: s.trips,
        last_cause: cause_name(s.last_cause).to_owned(),
        seconds_since_last_change: (s.last_change_ms != 0)
            .then(|| now_ms.saturating_sub(s.last_change_ms) as f64 / 1000.0),
        // The kernel keeps monotonic times: the wall clock now, less the time since.
        open_since_unix_seconds: (breaker_state(w) == BREAKER_OPEN && s.last_change_ms != 0).then(
            || {
                let ago = Duration::from_millis(now_ms.saturating_sub(s.last_change_ms));
                std::time::SystemTime::now()
                    .checked_sub(ago)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64())
            },
        ),
        open_for_seconds: (breaker_state(w) == BREAKER_OPEN && s.last_change_ms != 0)
            .then(|| until.saturating_sub(s.last_change_ms) as f64 / 1000.0),
    }
}

pub(crate) fn now_ms() -> u64 {
    monotonic_ns() / 1_000_000
}

/// The breakers of every type with one (or of `only`).
pub fn status(only: Option<&str>) -> Result<Vec<BreakerView>> {
    let policies = pinned::breaker_limits()?;
    let states = pinned::breaker_state()?;
    let now = now_ms();
    let side = pinned::policy_side()?;
    let mut out = Vec::new();
    for (index, l) in pinned::types()? {
        let name = name_of(&l.name);
        if only.is_some_and(|o| o != name) {
            continue;
        }
        if policies.get(&policy_index(side, index), 0)?.enabled == 0 {
            continue;
        }
        out.push(view(&name, &states.get(&index, 0)?, now));
    }
    if let Some(o) = only {
        if out.is_empty() {
            bail!("type {o:?} has no breaker in the policy in force (add [type.breaker])");
        }
    }
    Ok(out)
}

/// Reads, changes and writes back one type's breaker state. The kernel updates the same value
/// with atomics; a manual change racing with a kernel transition may lose one of them, which
/// is acceptable for commands a human or a runtime issues.
fn update(
    name: &str,
    change: impl FnOnce(&mut BreakerState, &BreakerLimits, u64) -> Option<Transition>,
) -> Result<(BreakerView, Option<Transition>)> {
    let index = type_index(name)?;
    let policy = pinned::breaker_limits()?.get(&policy_index(pinned::policy_side()?, index), 0)?;
    if policy.enabled == 0 {
        bail!("type {name:?} has no breaker in the policy in force (add [type.breaker])");
    }
    let mut states = pinned::breaker_state()?;
    let mut s = states.get(&index, 0)?;
    let now = now_ms();
    let t = change(&mut s, &policy, now);
    if let Some(t) = &t {
        if t.to == BREAKER_OPEN {
            s.trips += 1;
        }
        s.last_cause = t.cause as u64;
        s.last_change_ms = now;
    }
    states
        .set(index, s, 0)
        .context("writing the breaker state")?;
    Ok((view(name, &s, now), t))
}

/// Opens the breaker for `duration` (default: the current backoff step's open time).
pub fn open(name: &str, duration: Option<Duration>) -> Result<BreakerView> {
    update(name, |s, p, now| {
        let step = breaker_step(s.word);
        let d = duration.map_or_else(|| open_for(p, step), |d| d.as_millis() as u64);
        let from = breaker_state(s.word);
        s.word = breaker_word(BREAKER_OPEN, step, now + d);
        s.probe_instance = 0;
        Some(Transition {
            from,
            to: BREAKER_OPEN,
            cause: Cause::Manual,
            until_ms: now + d,
        })
    })
    .map(|(v, _)| v)
}

/// Closes the breaker, resets its backoff and forgets past failures.
pub fn close(name: &str) -> Result<BreakerView> {
    update(name, |s, _, _| {
        let from = breaker_state(s.word);
        s.word = 0;
        s.probe_instance = 0;
        s.failures = [0; spawnguard_common::FAILURE_RING];
        s.failure_next = 0;
        s.storm_count = 0;
        Some(Transition {
            from,
            to: BREAKER_CLOSED,
            cause: Cause::Manual,
            until_ms: 0,
        })
    })
    .map(|(v, _)| v)
}

/// Counts one failure reported by a runtime (an upstream that is down), exactly as a start-up
/// failure: `failures` of them within `within` open the breaker for every instance of the type.
pub fn report_failure(name: &str) -> Result<(BreakerView, bool)> {
    let (v, t) = update(name, |s, p, now| {
        let word = AtomicU64::new(s.word);
        let next = AtomicU64::new(s.failure_next);
        let ring = s.failures.map(AtomicU64::new);
        let t = breaker_instance_ended(&word, &ring, &next, now, 0, false, p);
        s.word = word.load();
        s.failure_next = next.load();
        s.failures = ring.map(|a| a.load());
        t
    })?;
    Ok((v, t.is_some_and(|t| t.to == BREAKER_OPEN)))
}

/// Local wall-clock time `d` from now, as HH:MM:SS UTC.
/// The latest time spawnguard writes (9999-12-31T23:59:59Z, the last RFC 3339 can hold): a
/// deadline read from a map may be any number.
pub(crate) fn latest() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// Now plus `d`, at most `LATEST`.
pub(crate) fn after(d: Duration) -> std::time::SystemTime {
    std::time::SystemTime::now()
        .checked_add(d)
        .map_or(latest(), |t| t.min(latest()))
}

pub(crate) fn wall_clock_in(d: Duration) -> String {
    let t = after(d);
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |x| x.as_secs());
    format!(
        "{:02}:{:02}:{:02} UTC",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// One line for a breaker.
pub fn describe(v: &BreakerView) -> String {
    let mut line = format!("{}: {} (backoff step {}", v.type_name, v.state, v.step);
    if let Some(r) = v.retry_in_seconds {
        line += &format!(", retry in {r:.0} s");
    }
    line += &format!(", opened {} times, last: {})", v.trips, v.last_cause);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of breaker states come from `BreakerPhase`: its codes are the kernel's.
    #[test]
    fn breaker_phases_are_the_kernel_states() {
        assert_eq!(BreakerPhase::Closed as u64, BREAKER_CLOSED);
        assert_eq!(BreakerPhase::Open as u64, BREAKER_OPEN);
        assert_eq!(BreakerPhase::HalfOpen as u64, BREAKER_PROBING);
        assert_eq!(state_name(BREAKER_PROBING), "half-open");
        assert_eq!(state_name(3), "unknown");
        assert_eq!(state_name(1 << 40), "unknown");
    }

    /// The open duration is the opening's own (deadline less the time it opened), so an alert can
    /// tell "open longer than it should be" from the time since it opened; it stays while the
    /// open time is over and the breaker waits for a probe, and is gone once it is not open.
    #[test]
    fn an_open_breaker_reports_how_long_its_opening_lasts() {
        let opened = BreakerState {
            word: breaker_word(BREAKER_OPEN, 1, 100_000 + 120_000),
            last_change_ms: 100_000,
            ..Default::default()
        };
        let v = view("t", &opened, 130_000);
        assert_eq!(
            (v.state.as_str(), v.open_for_seconds),
            ("open", Some(120.0))
        );
        assert_eq!(v.retry_in_seconds, Some(90.0));
        let waiting = view("t", &opened, 400_000);
        assert_eq!(
            (waiting.state.as_str(), waiting.open_for_seconds),
            ("half-open", Some(120.0))
        );
        let probing = BreakerState {
            word: breaker_word(BREAKER_PROBING, 2, 500_000),
            last_change_ms: 400_000,
            ..Default::default()
        };
        assert_eq!(view("t", &probing, 410_000).open_for_seconds, None);
        let closed = BreakerState::default();
        assert_eq!(view("t", &closed, 410_000).open_for_seconds, None);
    }

    #[test]
    fn every_breaker_cause_has_a_name() {
        assert_eq!(cause_name(Cause::Failures as u64), "start-up failures");
        assert_eq!(cause_name(Cause::ProbeAbandoned as u64), "probe never ran");
        assert_eq!(cause_name(0), "-");
        assert_eq!(cause_name(8), "-");
    }
}
