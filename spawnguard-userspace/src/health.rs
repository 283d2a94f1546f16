//! `/healthz` and `/readyz` on the metrics listener. Both are cheap: `/healthz` reads the loops'
//! heartbeats (atomics), `/readyz` a flag and, at most once a second, a stat of each pinned
//! link. A probe never reads the kernel maps.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use crate::{loader, notify::Heartbeat};

/// A loop that has not turned for this long is stuck (they turn every 0.5 s).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// How long a look at the pinned links is reused.
const PINS_CACHED_FOR: Duration = Duration::from_secs(1);

pub struct Health {
    loops: Vec<(&'static str, Heartbeat)>,
    ready: AtomicBool,
    /// The links the enforcer pinned at start: each one keeps a program attached.
    links: Vec<PathBuf>,
    /// The last look at `links`: when, and the first one missing.
    pins: Mutex<Option<(Instant, Option<PathBuf>)>>,
    /// A loop that has not turned yet is given [`STALE_AFTER`] from here: the listener can
    /// answer before every loop's first turn.
    started: Instant,
}

impl Health {
    pub fn new(loops: Vec<(&'static str, Heartbeat)>, links: Vec<PathBuf>) -> Self {
        Self {
            loops,
            ready: AtomicBool::new(false),
            links,
            pins: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// The enforcer is attached and the policy in force.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `/healthz`: every loop turned within [`STALE_AFTER`]; else which one did not.
    pub fn alive(&self) -> Result<(), String> {
        self.alive_after(self.started.elapsed())
    }

    /// [`Self::alive`], `since_start` after the loops were started.
    fn alive_after(&self, since_start: Duration) -> Result<(), String> {
        let stuck: Vec<String> = self
            .loops
            .iter()
            .filter_map(|(name, h)| match h.since_last_beat() {
                Some(d) if d < STALE_AFTER => None,
                Some(d) => Some(format!("{name} did not turn for {}s", d.as_secs())),
                None if since_start < STALE_AFTER => None,
                None => Some(format!("{name} never turned")),
            })
            .collect();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck.join("; "))
        }
    }

    /// `/readyz`: the enforcer is attached, the policy in force, and its pinned links are
    /// still there (a link removed by hand, or by `spawnguard uninstall`, detaches its program).
    pub fn ready(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err("starting: the enforcer is not in force yet".into());
        }
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let missing = match &*pins {
            Some((at, missing)) if at.elapsed() < PINS_CACHED_FOR => missing.clone(),
            _ => {
                let missing = self
                    .links
                    .iter()
                    .find(|l| std::fs::symlink_metadata(l).is_err())
                    .cloned();
                *pins = Some((Instant::now(), missing.clone()));
                missing
            }
        };
        match missing {
            None => Ok(()),
            Some(l) => Err(format!(
                "the pinned link {} is gone: the enforcer is detached (restart the daemon)",
                l.display()
            )),
        }
    }
}

/// The links of the installed enforcer, as pinned now.
pub fn pinned_links() -> Vec<PathBuf> {
    let dir = loader::pin_dir().join("links");
    let mut links: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    links.sort();
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_while_every_loop_turns() {
        let (a, b) = (Heartbeat::default(), Heartbeat::default());
        let h = Health::new(vec![("a", a.clone()), ("b", b.clone())], vec![]);
        // Just started: a loop that has not turned yet is not stuck.
        assert_eq!(h.alive_after(Duration::ZERO), Ok(()));
        a.beat();
        assert_eq!(h.alive_after(STALE_AFTER), Err("b never turned".into()));
        b.beat();
        assert_eq!(h.alive_after(STALE_AFTER), Ok(()));
    }

    #[test]
    fn ready_once_in_force_and_while_the_links_exist() {
        let dir = std::env::temp_dir().join(format!("sg-health-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("task_alloc");
        std::fs::write(&link, "").unwrap();
        let h = Health::new(vec![], vec![link.clone()]);
        assert!(h.ready().unwrap_err().starts_with("starting"));
        h.set_ready();
        assert_eq!(h.ready(), Ok(()));
        std::fs::remove_file(&link).unwrap();
        // The answer is reused for a second, then the link is looked at again.
        assert_eq!(h.ready(), Ok(()));
        *h.pins.lock().unwrap() = None;
        assert!(h.ready().unwrap_err().contains("is gone"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
