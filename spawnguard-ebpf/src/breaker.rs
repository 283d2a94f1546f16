//! Circuit breaker, one per type. Its state, backoff step and deadline live in one word so every
//! transition is a single compare-and-swap: state (2 bits) | step (6 bits) | deadline in ms
//! (56 bits, `bpf_ktime_get_ns` / 1e6).

use crate::AtomicU64;

pub const BREAKER_CLOSED: u64 = 0;
/// Refusing new instances until the deadline; after it, the first new instance is the probe.
pub const BREAKER_OPEN: u64 = 1;
/// A probe instance is running; the deadline is the end of its start-up window.
pub const BREAKER_PROBING: u64 = 2;

const UNTIL_MASK: u64 = (1 << 56) - 1;
pub use spawnguard_common::{BREAKER_STEPS, FAILURE_RING};

pub const fn breaker_word(state: u64, step: u64, until_ms: u64) -> u64 {
    (state << 62) | ((step & 0x3f) << 56) | (until_ms & UNTIL_MASK)
}
pub const fn breaker_state(word: u64) -> u64 {
    word >> 62
}
pub const fn breaker_step(word: u64) -> u64 {
    (word >> 56) & 0x3f
}
pub const fn breaker_until(word: u64) -> u64 {
    word & UNTIL_MASK
}

/// Why a breaker changed state (its names are userspace's).
pub use spawnguard_common::BreakerCause as Cause;

/// A state change, for the event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: u64,
    pub to: u64,
    pub cause: Cause,
    /// New word's deadline (ms): next retry time when opened.
    pub until_ms: u64,
}

/// The breaker policy of one type, in milliseconds (`enabled == 0`: always closed). The map
/// value itself, used in place: it is too large to copy onto the BPF stack.
pub use spawnguard_common::BreakerLimits as BreakerPolicy;

/// Open duration of backoff `step`; the last configured step repeats.
#[inline(always)]
pub fn open_for(p: &BreakerPolicy, step: u64) -> u64 {
    let last = if p.steps == 0 { 0 } else { p.steps - 1 };
    let i = if step < last { step } else { last };
    p.open_for_ms[(i as usize) & (BREAKER_STEPS - 1)]
}

/// What the breaker says about a new instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// This instance is the half-open probe (exactly one per open period).
    Probe,
    /// Refused until `until_ms` (a probe is running when `probing`).
    Refused {
        until_ms: u64,
        probing: bool,
    },
}

#[inline(always)]
fn swap(word: &AtomicU64, old: u64, new: u64) -> bool {
    word.compare_exchange(old, new).is_ok()
}

/// Asks the breaker whether a new instance may start now. Claims the probe in half-open (one
/// compare-and-swap: two racing instances cannot both be the probe), and closes the breaker
/// when a probe has outlived its window. A word that other CPUs keep changing lets the instance
/// through (fail open).
#[inline(always)]
pub fn breaker_gate(
    word: &AtomicU64,
    now_ms: u64,
    p: &BreakerPolicy,
) -> (Gate, Option<Transition>) {
    if p.enabled == 0 {
        return (Gate::Pass, None);
    }
    // Two tries: a lost compare-and-swap means another CPU just made the transition, and the
    // second look sees its result. (Few tries also keep the verifier's work small.)
    for _ in 0..2 {
        let w = word.load();
        let (state, step, until) = (breaker_state(w), breaker_step(w), breaker_until(w));
        if state == BREAKER_CLOSED {
            return (Gate::Pass, None);
        }
        if now_ms < until {
            return (
                Gate::Refused {
                    until_ms: until,
                    probing: state == BREAKER_PROBING,
                },
                None,
            );
        }
        if state == BREAKER_OPEN {
            let deadline = now_ms + p.startup_window_ms;
            if swap(word, w, breaker_word(BREAKER_PROBING, step, deadline)) {
                let t = Transition {
                    from: BREAKER_OPEN,
                    to: BREAKER_PROBING,
                    cause: Cause::ProbeAdmitted,
                    until_ms: deadline,
                };
                return (Gate::Probe, Some(t));
            }
        } else if swap(word, w, breaker_word(BREAKER_CLOSED, 0, 0)) {
            // The probe outlived its start-up window: healthy.
            let t = Transition {
                from: BREAKER_PROBING,
                to: BREAKER_CLOSED,
                cause: Cause::ProbeHealthy,
                until_ms: 0,
            };
            return (Gate::Pass, Some(t));
        }
    }
    (Gate::Pass, None)
}

/// Opens the breaker from `expect_state` with the backoff of `step`.
#[inline(always)]
fn trip(
    word: &AtomicU64,
    w: u64,
    step: u64,
    now_ms: u64,
    p: &BreakerPolicy,
    cause: Cause,
) -> Option<Transition> {
    let step = if step >= 0x3f { 0x3f } else { step };
    let until = now_ms + open_for(p, step);
    if swap(word, w, breaker_word(BREAKER_OPEN, step, until)) {
        Some(Transition {
            from: breaker_state(w),
            to: BREAKER_OPEN,
            cause,
            until_ms: until,
        })
    } else {
        None
    }
}

/// Records one start-up failure at `now_ms` in the ring; returns whether `failures` of them
/// fell within `within_ms`.
#[inline(always)]
pub fn record_failure(
    ring: &[AtomicU64; FAILURE_RING],
    next: &AtomicU64,
    now_ms: u64,
    p: &BreakerPolicy,
) -> bool {
    let i = next.fetch_add(1);
    ring[(i as usize) & (FAILURE_RING - 1)].store(now_ms);
    if p.failures <= 1 {
        return true;
    }
    if i + 1 < p.failures {
        return false;
    }
    let oldest = ring[((i + 1 - p.failures) as usize) & (FAILURE_RING - 1)].load();
    now_ms.saturating_sub(oldest) <= p.within_ms
}

/// The breaker's view of an instance that ended (its last task left) after living `lived_ms`
/// since admission. A start-up failure counts toward opening; the probe's end decides the
/// half-open state.
#[inline(always)]
pub fn breaker_instance_ended(
    word: &AtomicU64,
    ring: &[AtomicU64; FAILURE_RING],
    next: &AtomicU64,
    now_ms: u64,
    lived_ms: u64,
    was_probe: bool,
    p: &BreakerPolicy,
) -> Option<Transition> {
    if p.enabled == 0 {
        return None;
    }
    let failed = lived_ms < p.startup_window_ms;
    let w = word.load();
    if was_probe && breaker_state(w) == BREAKER_PROBING {
        return if failed {
            trip(word, w, breaker_step(w) + 1, now_ms, p, Cause::ProbeFailed)
        } else if swap(word, w, breaker_word(BREAKER_CLOSED, 0, 0)) {
            Some(Transition {
                from: BREAKER_PROBING,
                to: BREAKER_CLOSED,
                cause: Cause::ProbeHealthy,
                until_ms: 0,
            })
        } else {
            None
        };
    }
    if failed && record_failure(ring, next, now_ms, p) && breaker_state(w) == BREAKER_CLOSED {
        return trip(word, w, breaker_step(w), now_ms, p, Cause::Failures);
    }
    None
}

/// A probe that was admitted by the breaker but refused by another budget never ran: reopen
/// the half-open gate at once for the next instance.
#[inline(always)]
pub fn breaker_abandon_probe(word: &AtomicU64, now_ms: u64) -> Option<Transition> {
    let w = word.load();
    if breaker_state(w) == BREAKER_PROBING
        && swap(word, w, breaker_word(BREAKER_OPEN, breaker_step(w), now_ms))
    {
        return Some(Transition {
            from: BREAKER_PROBING,
            to: BREAKER_OPEN,
            cause: Cause::ProbeAbandoned,
            until_ms: now_ms,
        });
    }
    None
}

/// Counts an enforced denial in the type's deny-storm window; opens a closed breaker when the
/// window holds `storm_denials`.
#[inline(always)]
pub fn breaker_denial(
    word: &AtomicU64,
    storm_start: &AtomicU64,
    storm_count: &AtomicU64,
    now_ms: u64,
    p: &BreakerPolicy,
) -> Option<Transition> {
    if p.enabled == 0 || p.storm_denials == 0 {
        return None;
    }
    let start = storm_start.load();
    let count = if now_ms.saturating_sub(start) > p.storm_within_ms {
        if storm_start.compare_exchange(start, now_ms).is_ok() {
            storm_count.store(1);
        } else {
            storm_count.fetch_add(1);
        }
        1
    } else {
        storm_count.fetch_add(1) + 1
    };
    let w = word.load();
    if count >= p.storm_denials && breaker_state(w) == BREAKER_CLOSED {
        return trip(word, w, breaker_step(w), now_ms, p, Cause::DenyStorm);
    }
    None
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{sync::Arc, thread, vec::Vec};

    use super::*;

    fn breaker_policy() -> BreakerPolicy {
        let mut open_for_ms = [0; BREAKER_STEPS];
        open_for_ms[..3].copy_from_slice(&[1_000, 2_000, 5_000]);
        BreakerPolicy {
            enabled: 1,
            _pad: 0,
            startup_window_ms: 100,
            failures: 3,
            within_ms: 1_000,
            open_for_ms,
            steps: 3,
            storm_denials: 0,
            storm_within_ms: 0,
        }
    }

    struct Breaker {
        word: AtomicU64,
        ring: [AtomicU64; FAILURE_RING],
        next: AtomicU64,
    }

    impl Breaker {
        fn new() -> Self {
            Self {
                word: AtomicU64::new(0),
                ring: core::array::from_fn(|_| AtomicU64::new(0)),
                next: AtomicU64::new(0),
            }
        }
        fn ended(
            &self,
            now: u64,
            lived: u64,
            probe: bool,
            p: &BreakerPolicy,
        ) -> Option<Transition> {
            breaker_instance_ended(&self.word, &self.ring, &self.next, now, lived, probe, p)
        }
    }

    #[test]
    fn three_quick_failures_open_then_one_probe_then_backoff() {
        let p = breaker_policy();
        let b = Breaker::new();
        assert_eq!(b.ended(10, 5, false, &p), None);
        assert_eq!(
            b.ended(20, 150, false, &p),
            None,
            "a healthy instance is no failure"
        );
        assert_eq!(b.ended(30, 5, false, &p), None);
        let t = b.ended(40, 5, false, &p).unwrap();
        assert_eq!(
            (t.to, t.cause, t.until_ms),
            (BREAKER_OPEN, Cause::Failures, 1_040)
        );
        assert_eq!(
            breaker_gate(&b.word, 500, &p).0,
            Gate::Refused {
                until_ms: 1_040,
                probing: false
            }
        );
        // Open time over: exactly one probe.
        let (gate, t) = breaker_gate(&b.word, 1_050, &p);
        assert_eq!(gate, Gate::Probe);
        assert_eq!(t.unwrap().cause, Cause::ProbeAdmitted);
        assert!(matches!(
            breaker_gate(&b.word, 1_060, &p).0,
            Gate::Refused { probing: true, .. }
        ));
        // The probe fails: open again with the next duration.
        let t = b.ended(1_070, 20, true, &p).unwrap();
        assert_eq!((t.cause, t.until_ms), (Cause::ProbeFailed, 3_070));
        assert_eq!(breaker_step(b.word.load()), 1);
        assert_eq!(breaker_gate(&b.word, 3_070, &p).0, Gate::Probe);
        let t = b.ended(3_080, 1, true, &p).unwrap();
        assert_eq!(t.until_ms, 8_080, "third duration");
        assert_eq!(breaker_gate(&b.word, 8_080, &p).0, Gate::Probe);
        let t = b.ended(8_090, 1, true, &p).unwrap();
        assert_eq!(t.until_ms, 13_090, "the last duration repeats");
        // A healthy probe (outlives its window, seen at the next gate) closes and resets.
        assert_eq!(breaker_gate(&b.word, 13_090, &p).0, Gate::Probe);
        let (gate, t) = breaker_gate(&b.word, 13_200, &p);
        assert_eq!(gate, Gate::Pass);
        assert_eq!(t.unwrap().cause, Cause::ProbeHealthy);
        assert_eq!(b.word.load(), 0, "closed, backoff reset");
    }

    #[test]
    fn a_probe_that_ends_after_its_window_closes_the_breaker() {
        let p = breaker_policy();
        let b = Breaker::new();
        b.word.store(breaker_word(BREAKER_PROBING, 2, 500));
        let t = b.ended(600, 150, true, &p).unwrap();
        assert_eq!((t.to, t.cause), (BREAKER_CLOSED, Cause::ProbeHealthy));
        assert_eq!(b.word.load(), 0);
    }

    #[test]
    fn failures_spread_wider_than_within_do_not_open() {
        let p = breaker_policy();
        let b = Breaker::new();
        for now in [0, 600, 1_200, 1_800, 2_400] {
            assert_eq!(b.ended(now, 1, false, &p), None, "at {now}");
        }
    }

    #[test]
    fn racing_instances_in_half_open_one_probe() {
        let p = breaker_policy();
        for _ in 0..200 {
            let word = Arc::new(AtomicU64::new(breaker_word(BREAKER_OPEN, 0, 10)));
            let probes: usize = (0..4)
                .map(|_| {
                    let word = Arc::clone(&word);
                    thread::spawn(move || breaker_gate(&word, 20, &p).0 == Gate::Probe)
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&probe| probe)
                .count();
            assert_eq!(probes, 1);
        }
    }

    #[test]
    fn a_deny_storm_opens_a_closed_breaker() {
        let p = BreakerPolicy {
            storm_denials: 3,
            storm_within_ms: 100,
            ..breaker_policy()
        };
        let (w, start, count) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        assert_eq!(breaker_denial(&w, &start, &count, 1_000, &p), None);
        assert_eq!(breaker_denial(&w, &start, &count, 1_050, &p), None);
        assert_eq!(
            breaker_denial(&w, &start, &count, 1_300, &p),
            None,
            "window restarted"
        );
        assert_eq!(breaker_denial(&w, &start, &count, 1_310, &p), None);
        let t = breaker_denial(&w, &start, &count, 1_320, &p).unwrap();
        assert_eq!(t.cause, Cause::DenyStorm);
    }

    #[test]
    fn a_disabled_breaker_always_passes() {
        let p = BreakerPolicy {
            enabled: 0,
            ..breaker_policy()
        };
        let b = Breaker::new();
        for now in 0..10 {
            assert_eq!(b.ended(now, 0, false, &p), None);
        }
        assert_eq!(breaker_gate(&b.word, 10, &p).0, Gate::Pass);
    }
}
