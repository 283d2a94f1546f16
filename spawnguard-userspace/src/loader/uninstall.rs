//! Uninstalling: every pinned enforcer removed, and the wait until the kernel runs none of
//! their programs.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};

use super::PIN_ROOT;

/// How long `uninstall` waits for the kernel to detach the programs.
const DETACH_WAIT: Duration = Duration::from_secs(30);

/// Detaches and removes every pinned enforcer (all layouts), and returns once the kernel runs
/// none of its programs. A pin is a pinned link's last reference (the daemon keeps no program
/// or link open), and the kernel drops it after an RCU grace period, from a workqueue: without
/// the wait, a fork right after `uninstall` could still be refused (seen on 5.10 under qemu).
pub fn uninstall() -> Result<bool> {
    let root = Path::new(PIN_ROOT);
    if !root.exists() {
        return Ok(false);
    }
    let programs = pinned_programs(root);
    std::fs::remove_dir_all(root).with_context(|| format!("removing {PIN_ROOT}"))?;
    let started = Instant::now();
    let deadline = started + DETACH_WAIT;
    loop {
        let left = aya::programs::loaded_programs()
            .flatten()
            .filter(|p| programs.contains(&p.id()))
            .count();
        if left == 0 {
            tracing::debug!(
                "the kernel let go of {} programs {} ms after their pins went",
                programs.len(),
                started.elapsed().as_millis()
            );
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!(
                "removed {PIN_ROOT}, but after {} s the kernel still runs {left} of its programs",
                DETACH_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The programs behind the links pinned under `root` (every layout's `links/`).
fn pinned_programs(root: &Path) -> Vec<u32> {
    let links = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|layout| {
            std::fs::read_dir(layout.path().join("links"))
                .into_iter()
                .flatten()
        })
        .flatten();
    links
        .filter_map(|entry| PinnedLink::from_pin(entry.path()).ok())
        .filter_map(|pinned| FdLink::from(pinned).info().ok())
        .map(|info| info.program_id())
        .collect()
}
