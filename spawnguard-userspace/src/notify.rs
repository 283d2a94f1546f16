//! systemd's service protocol (`Type=notify`, through the `sd-notify` crate): `READY=1` once the
//! enforcer is in force, `STATUS=` lines, `STOPPING=1`, and a watchdog whose `WATCHDOG=1` pings
//! prove that the loops that matter still turn. Without `NOTIFY_SOCKET` (not started by
//! systemd) every call here does nothing.
//!
//! The watchdog owns nothing of the others: each loop owns a [`Heartbeat`] it bumps on every
//! turn (idle loops turn on a timer too), and the watchdog only reads them. The control socket
//! and the policy task are proved by a request: the watchdog asks the daemon's own socket for a
//! `Ping`, which the accept loop takes and the main loop answers.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use sd_notify::NotifyState;

/// How often a loop that has nothing to do still turns (and beats). The watchdog's period must
/// be longer: systemd's `WatchdogSec=` at least 2 s.
pub const BEAT: Duration = Duration::from_millis(500);

/// A loop's proof of life: the monotonic time (ms) of its last turn, which its owner moves
/// forward on every turn (by at least 1, so two turns in one millisecond still count as two).
/// The watchdog only asks whether it moved; `/healthz` also asks how long ago.
#[derive(Clone, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    pub fn beat(&self) {
        let now = crate::host::monotonic_ns() / 1_000_000;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last.wrapping_add(1)))
            });
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// How long ago the loop last turned (never: `None`).
    pub fn since_last_beat(&self) -> Option<Duration> {
        let last = self.count();
        (last != 0).then(|| {
            Duration::from_millis((crate::host::monotonic_ns() / 1_000_000).saturating_sub(last))
        })
    }
}

/// The watchdog's decision, without clocks or sockets: which loops did not turn between two
/// rounds.
pub struct Liveness {
    last: Vec<u64>,
}

impl Liveness {
    /// Starts from the counts seen now.
    pub fn new(counts: &[u64]) -> Self {
        Self {
            last: counts.to_vec(),
        }
    }

    /// Takes this round's counts; returns the indexes of the loops whose count did not move
    /// since the previous round (none: all of them are alive).
    pub fn stale(&mut self, counts: &[u64]) -> Vec<usize> {
        let stale = counts
            .iter()
            .zip(&self.last)
            .enumerate()
            .filter(|(_, (now, before))| now == before)
            .map(|(i, _)| i)
            .collect();
        self.last = counts.to_vec();
        stale
    }
}

fn send(state: &[NotifyState]) {
    // A service manager that went away is no reason to stop enforcing.
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// A `STATUS=` value is one line of the message: a multi-line error (a policy file's, say)
/// would end it early.
fn one_line(status: &str) -> String {
    status.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `READY=1`: the enforcer is attached, the policy in force and the control socket bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
}

/// A `STATUS=` line (`systemctl status` shows the last one).
pub fn status(status: &str) {
    send(&[NotifyState::Status(&one_line(status))]);
}

/// `STOPPING=1`: a clean stop has begun.
pub fn stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&one_line(status)),
    ]);
}

/// The ping period systemd asked for (`WATCHDOG_USEC`, halved as sd_watchdog_enabled(3)
/// recommends), if it asked.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|usec| usec / 2)
}

/// Pings systemd every `period` while every loop in `loops` beat since the last round and the
/// control socket answers a `Ping` (through the main loop) within `period`. A round that fails
/// is logged, not pinged: systemd restarts the daemon when no ping comes for `WatchdogSec=`.
pub async fn watchdog(period: Duration, loops: Vec<(&'static str, Heartbeat)>) -> Result<()> {
    let counts = || loops.iter().map(|(_, h)| h.count()).collect::<Vec<_>>();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut liveness = Liveness::new(&counts());
    loop {
        tick.tick().await;
        let answered = tokio::time::timeout(period, crate::control::ping()).await;
        let stale: Vec<&str> = liveness
            .stale(&counts())
            .into_iter()
            .map(|i| loops[i].0)
            .collect();
        match answered {
            Ok(Ok(())) if stale.is_empty() => send(&[NotifyState::Watchdog]),
            Ok(Ok(())) => tracing::warn!(
                "watchdog: {} did not turn in {}; not pinging systemd",
                stale.join(", "),
                humantime::format_duration(period)
            ),
            Ok(Err(e)) => tracing::warn!(
                "watchdog: the control socket did not answer: {e:#}; not pinging systemd"
            ),
            Err(_) => tracing::warn!(
                "watchdog: the control socket did not answer in {}; not pinging systemd",
                humantime::format_duration(period)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loops_that_turned_are_alive() {
        let mut l = Liveness::new(&[0, 0, 0]);
        assert_eq!(l.stale(&[1, 5, 2]), Vec::<usize>::new());
        // The second did not move since the previous round.
        assert_eq!(l.stale(&[2, 5, 3]), [1]);
        // Moving again makes it alive again; a round compares with the one before it only.
        assert_eq!(l.stale(&[3, 6, 4]), Vec::<usize>::new());
        assert_eq!(l.stale(&[3, 6, 4]), [0, 1, 2]);
        // A counter that wrapped around moved too.
        let mut w = Liveness::new(&[u64::MAX]);
        assert!(w.stale(&[0]).is_empty());
    }

    #[test]
    fn heartbeats_count_turns_across_clones() {
        let h = Heartbeat::default();
        let owner = h.clone();
        let mut l = Liveness::new(&[h.count()]);
        assert_eq!(l.stale(&[h.count()]), [0]);
        owner.beat();
        assert!(l.stale(&[h.count()]).is_empty());
        // Two turns in the same millisecond still move it.
        owner.beat();
        assert!(l.stale(&[h.count()]).is_empty());
        assert!(h.since_last_beat().unwrap() < Duration::from_secs(1));
        assert_eq!(Heartbeat::default().since_last_beat(), None);
    }

    #[test]
    fn a_status_is_one_line() {
        assert_eq!(
            one_line("policy.toml:3:1: invalid\n  |\n3 | x\n"),
            "policy.toml:3:1: invalid | 3 | x"
        );
    }

    #[test]
    fn no_notify_socket_means_nothing_is_sent() {
        // Outside systemd: no socket, no error, no watchdog.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            ready("test");
            status("test");
            stopping("test");
        }
        if std::env::var_os("WATCHDOG_USEC").is_none() {
            assert_eq!(watchdog_period(), None);
        }
    }
}
