//! The one place that decides, for every command, whether the daemon answers or the pinned maps
//! do. A read may fall back whenever the daemon does not answer. A change (and reading the
//! event ring, which consumes it) may only when no daemon runs: a daemon that runs but fails
//! must never be bypassed behind its back.

use anyhow::{bail, Result};

use crate::control::{self, Request, Unreachable, SOCKET};

/// When a command may do without the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Reads: the pinned maps answer when no daemon runs, or when it does not answer.
    WhenUnanswered,
    /// Changes, and the event ring: the pinned maps only when no daemon runs.
    WhenNotRunning,
}

/// Who answers a command.
#[derive(Debug)]
pub enum Route<T> {
    /// The daemon did, with this.
    Daemon(T),
    /// The pinned maps are to: no daemon runs (`None`), or it runs and did not answer (why).
    Pinned(Option<anyhow::Error>),
}

/// Routes a command by what its call to the daemon gave. A daemon's own error (it answered,
/// with a refusal) is the command's error, never a reason to go around it.
pub fn route<T>(fallback: Fallback, call: Result<Result<T>, Unreachable>) -> Result<Route<T>> {
    match call {
        Ok(answer) => Ok(Route::Daemon(answer?)),
        Err(Unreachable::NotRunning) => Ok(Route::Pinned(None)),
        Err(Unreachable::Other(e)) if fallback == Fallback::WhenUnanswered => {
            Ok(Route::Pinned(Some(e)))
        }
        Err(Unreachable::Other(e)) => Err(e),
    }
}

/// For commands only the daemon can answer (policy apply and show), with the answer read as
/// `T` (what the request is answered with: see `control::Reply`).
pub fn daemon_only<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T> {
    match control::ask(request) {
        Ok(result) => result,
        Err(Unreachable::NotRunning) => bail!(
            "the spawnguard daemon is not running ({SOCKET} does not answer); start it with \
             `spawnguard run`"
        ),
        Err(Unreachable::Other(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    fn unanswered() -> Result<Result<u32>, Unreachable> {
        Err(Unreachable::Other(anyhow!("timed out")))
    }

    #[test]
    fn reads_go_around_a_daemon_that_does_not_answer_changes_never_do() {
        assert!(matches!(
            route(Fallback::WhenUnanswered, unanswered()),
            Ok(Route::Pinned(Some(_)))
        ));
        assert!(route(Fallback::WhenNotRunning, unanswered()).is_err());
        for fallback in [Fallback::WhenUnanswered, Fallback::WhenNotRunning] {
            let none: Result<Result<u32>, Unreachable> = Err(Unreachable::NotRunning);
            assert!(matches!(route(fallback, none), Ok(Route::Pinned(None))));
            // The daemon answered with an error: that is the answer.
            assert!(route(fallback, Ok(Err::<u32, _>(anyhow!("no such type")))).is_err());
            assert!(matches!(route(fallback, Ok(Ok(7))), Ok(Route::Daemon(7))));
        }
    }
}
