//! The fork-rate bucket: a generic cell-rate algorithm kept in one word per instance.

use crate::{AtomicU64, CAS_ATTEMPTS};

/// Generic cell-rate algorithm: a token bucket of `burst` tokens refilled one token every
/// `interval_ns`, kept as one timestamp (the theoretical arrival time, `tat`) so it can be
/// updated with a single compare-and-swap. `window_ns` is `interval_ns * burst` (see
/// [`rate_window_ns`]; computed once by the loader, BPF has no 128-bit multiply). Returns the new
/// `tat` when a token is available.
#[inline(always)]
pub fn gcra_take(tat: u64, now: u64, interval_ns: u64, window_ns: u64) -> Option<u64> {
    let start = if tat > now { tat } else { now };
    let next = start.saturating_add(interval_ns);
    if next - now <= window_ns {
        Some(next)
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Taken,
    Empty,
    /// Other CPUs kept winning the compare-and-swap; the caller lets the task through (fail
    /// open) and counts it.
    Contended,
}

/// Bits of a bucket word that hold the theoretical arrival time; the top 8 hold the type's rate
/// generation it was taken under (2^56 ns is over two years of uptime).
pub const TAT_MASK: u64 = (1 << 56) - 1;

/// Takes one fork-rate token from the bucket kept in `tat`. A bucket taken under another rate
/// generation (`gen`: the policy's rate changed since) starts full, so a new rate applies from
/// the next fork instead of after the old bucket drains.
#[inline(always)]
pub fn take_token(tat: &AtomicU64, now: u64, interval_ns: u64, window_ns: u64, gen: u64) -> Token {
    let mut current = tat.load();
    let gen = (gen & 0xff) << 56;
    for _ in 0..CAS_ATTEMPTS {
        // Without a branch (each costs the verifier a path): the time if the generation is the
        // same, else 0. (A time past 2^56 ns, two years of uptime, spills into the generation:
        // the next fork then finds a full bucket, nothing worse.)
        let same = u64::from((current ^ gen) >> 56 == 0);
        let since = (current & TAT_MASK) * same;
        let Some(next) = gcra_take(since, now, interval_ns, window_ns) else {
            return Token::Empty;
        };
        match tat.compare_exchange(current, gen | next) {
            Ok(_) => return Token::Taken,
            Err(seen) => current = seen,
        }
    }
    Token::Contended
}

/// Gives back a token `take_token` took for a task refused afterwards (one interval off the
/// bucket's time). Lost if other CPUs keep changing the bucket: the instance then forks one
/// token later, never more than its rate.
#[inline(always)]
pub fn refund_token(tat: &AtomicU64, interval_ns: u64) {
    let mut current = tat.load();
    for _ in 0..CAS_ATTEMPTS {
        // The time bits hold at least one interval (a token was taken since), so the
        // generation above them is kept. No `min` here: a branch in the loop costs the
        // verifier a path per try.
        match tat.compare_exchange(current, current.wrapping_sub(interval_ns)) {
            Ok(_) => return,
            Err(seen) => current = seen,
        }
    }
}

/// Nanoseconds per token for a rate of `per_sec_milli` thousandths of a token per second.
pub const fn rate_interval_ns(per_sec_milli: u64) -> u64 {
    match 1_000_000_000_000u64.checked_div(per_sec_milli) {
        Some(ns) => ns,
        None => 0,
    }
}

/// The GCRA window for a bucket of `burst` tokens.
pub const fn rate_window_ns(interval_ns: u64, burst: u64) -> u64 {
    interval_ns.saturating_mul(burst)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{sync::Arc, thread, vec::Vec};

    use super::*;

    #[test]
    fn gcra_gives_burst_then_rate() {
        let interval = 100;
        let mut tat = 0;
        let now = 1_000_000;
        let mut granted = 0;
        while let Some(next) = gcra_take(tat, now, interval, 500) {
            tat = next;
            granted += 1;
        }
        assert_eq!(granted, 5, "full bucket");
        assert_eq!(gcra_take(tat, now + 99, interval, 500), None);
        assert!(gcra_take(tat, now + 100, interval, 500).is_some());
        // Over a long run: burst + t / interval.
        let (mut tat, mut granted) = (0, 0);
        for now in (now..now + 100_000).step_by(7) {
            if let Some(next) = gcra_take(tat, now, interval, 500) {
                tat = next;
                granted += 1;
            }
        }
        assert!((1004..=1005).contains(&granted), "{granted}");
    }

    #[test]
    fn idle_bucket_refills_to_burst_only() {
        let mut tat = gcra_take(0, 1_000, 10, 30).unwrap();
        let mut granted = 0;
        while let Some(next) = gcra_take(tat, 1_000_000, 10, 30) {
            tat = next;
            granted += 1;
        }
        assert_eq!(granted, 3);
    }

    #[test]
    fn racing_tokens_match_burst() {
        let tat = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let tat = Arc::clone(&tat);
                thread::spawn(move || {
                    (0..1000)
                        .filter(|_| {
                            take_token(&tat, 5_000, 1_000_000, 20_000_000, 0) != Token::Empty
                        })
                        .count()
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 20);
    }

    #[test]
    fn a_rate_change_starts_a_full_bucket() {
        // burst 4 at 0.1/s: four forks, then nothing for 10 s.
        let tat = AtomicU64::new(0);
        let (slow, slow_window) = (10_000_000_000, 40_000_000_000);
        let now = 1_000_000_000;
        let taken = (0..10)
            .filter(|_| take_token(&tat, now, slow, slow_window, 0) == Token::Taken)
            .count();
        assert_eq!(taken, 4);
        // Same policy: still empty.
        assert_eq!(take_token(&tat, now, slow, slow_window, 0), Token::Empty);
        // The policy changes to burst 1 at 1000/s (generation 1): the next fork passes at once,
        // and the new rate holds from then on.
        let (fast, fast_window) = (1_000_000, 1_000_000);
        assert_eq!(take_token(&tat, now, fast, fast_window, 1), Token::Taken);
        assert_eq!(take_token(&tat, now, fast, fast_window, 1), Token::Empty);
        assert_eq!(
            take_token(&tat, now + 1_000_000, fast, fast_window, 1),
            Token::Taken
        );
        // Generations wrap at 256: 257 is generation 1, whose bucket is empty.
        let later = now + 1_000_000;
        assert_eq!(
            take_token(&tat, later, fast, fast_window, 257),
            Token::Empty
        );
        assert_eq!(take_token(&tat, later, fast, fast_window, 2), Token::Taken);
    }

    #[test]
    fn interval_from_rate() {
        assert_eq!(rate_interval_ns(2_000), 500_000_000);
        assert_eq!(rate_interval_ns(0), 0);
    }
}
