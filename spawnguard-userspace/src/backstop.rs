//! The `pids.max` backstop (DESIGN.md). Where a pids controller covers an instance — the
//! instance's own directory on cgroup2, when its type directory enables `pids`, or a v1 pids
//! cgroup at the same relative path, as runc and podman make on hybrid hosts — the daemon writes
//! the type's `max_tasks` there as the instance's `pids.max`. It only ever lowers a limit: a
//! lower one that runc, podman or systemd set stays. That bounds what the budgets cannot: PIDs
//! held by refused children their parent never reaps (under the kill backends a refused child
//! is killed, and holds its PID until reaped), and every task while no enforcer runs.
//!
//! Every `SWEEP` a thread of its own lists the type directories. A new instance directory is
//! written at the sweep after the one that found it (its creator, runc say, has set its own
//! limit by then), so within two seconds of its creation; every limit is read again each
//! `RECHECK` and after a policy change, so a directory recreated at the same path, or a limit
//! someone raised over ours, is lowered again. A limit the backstop wrote follows the policy
//! (raised back at most to what was there before, given back when the type is no longer
//! enforced or by `uninstall`); one someone else lowered since is theirs. What it wrote is kept
//! in `STATE`, so a restarted daemon still knows its own.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{cgroupfs, loader::PlacedType};

/// How often the type directories are listed.
const SWEEP: Duration = Duration::from_secs(1);
/// How often every limit is read again.
const RECHECK: Duration = Duration::from_secs(10);
/// What the backstop wrote, for a restarted daemon and `uninstall`.
pub const STATE: &str = "/run/spawnguard/backstop.json";
/// The largest `pids.max` the kernel takes (`PID_MAX_LIMIT`); a larger budget writes none.
const PID_MAX_LIMIT: u64 = 4_194_304;

/// A `pids.max` as the kernel writes it (`max`: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PidsMax {
    Max,
    At(u64),
}

impl PidsMax {
    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "max" => Some(Self::Max),
            n => n.parse().ok().map(Self::At),
        }
    }

    fn value(self) -> u64 {
        match self {
            Self::Max => u64::MAX,
            Self::At(n) => n,
        }
    }

    fn text(self) -> String {
        match self {
            Self::Max => "max".to_owned(),
            Self::At(n) => n.to_string(),
        }
    }
}

/// What the backstop wrote in one `pids.max`, and what was there before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Written {
    before: PidsMax,
    wrote: PidsMax,
}

/// The value to write in a `pids.max` that reads `current`, for a type that wants `want`
/// (`None`: no limit of ours), given what the backstop wrote there before (`ours`). Returns the
/// value to write (if any) and what to remember.
fn decide(
    current: PidsMax,
    want: Option<u64>,
    ours: Option<Written>,
) -> (Option<PidsMax>, Option<Written>) {
    // Ours only while it still reads what we wrote: otherwise someone set it since.
    let before = match ours {
        Some(w) if w.wrote == current => w.before,
        _ => current,
    };
    let target = match want.filter(|&n| n <= PID_MAX_LIMIT) {
        Some(n) if n < before.value() => PidsMax::At(n),
        _ => before,
    };
    let write = (target != current).then_some(target);
    let remember = (target != before).then_some(Written {
        before,
        wrote: target,
    });
    (write, remember)
}

/// One `pids.max` file the backstop looked at.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Seen {
    /// The inode of its directory: another one is a directory recreated at the same path.
    dir_ino: u64,
    /// The type directory it is under.
    type_dir: PathBuf,
    /// Found at the last sweep, not written yet (its creator may still be setting it up).
    fresh: bool,
    ours: Option<Written>,
}

/// The v1 pids hierarchy's mount, on a hybrid host.
fn pids_v1_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let is_pids = r.next()? == "cgroup" && r.nth(1)?.split(',').any(|option| option == "pids");
        let mount = left.split_whitespace().nth(4)?;
        is_pids.then(|| PathBuf::from(mount))
    })
}

/// The `pids.max` files that cover an instance directory, with their directory's inode.
fn pids_files(instance: &Path, cgroup2: &Path, v1: Option<&Path>) -> Vec<(PathBuf, u64)> {
    let mut dirs = vec![instance.to_path_buf()];
    if let (Some(v1), Ok(relative)) = (v1, instance.strip_prefix(cgroup2)) {
        dirs.push(v1.join(relative));
    }
    dirs.into_iter()
        .filter_map(|dir| {
            let file = dir.join("pids.max");
            let ino = std::fs::metadata(&dir).ok()?.ino();
            file.exists().then_some((file, ino))
        })
        .collect()
}

/// Runs the backstop on this thread until the daemon's policy channel closes.
pub fn run(mut types: watch::Receiver<Vec<PlacedType>>, cgroup2: PathBuf) {
    let v1 = pids_v1_mount();
    match &v1 {
        Some(mount) => tracing::info!(
            "pids.max backstop: in the v1 pids cgroups at the instances' paths under {}, and \
             in instances whose type directory enables pids",
            mount.display()
        ),
        None => tracing::info!(
            "pids.max backstop: in instances whose type directory enables pids \
             (cgroup.subtree_control)"
        ),
    }
    let mut seen = load();
    let mut rechecked = Instant::now();
    let mut recheck = true;
    loop {
        std::thread::sleep(SWEEP);
        match types.has_changed() {
            Ok(true) => recheck = true,
            Ok(false) => {}
            Err(_) => return,
        }
        if rechecked.elapsed() >= RECHECK {
            recheck = true;
        }
        let current = types.borrow_and_update().clone();
        let changed = sweep(&current, &cgroup2, v1.as_deref(), &mut seen, recheck);
        if recheck {
            rechecked = Instant::now();
            recheck = false;
        }
        if changed {
            save(&seen);
        }
    }
}

/// One sweep; returns whether what the backstop wrote changed.
fn sweep(
    types: &[PlacedType],
    cgroup2: &Path,
    v1: Option<&Path>,
    seen: &mut HashMap<PathBuf, Seen>,
    recheck: bool,
) -> bool {
    let mut changed = false;
    for t in types {
        // (A type directory that cannot be listed keeps what it has: nothing is given back.)
        let Ok(instances) = cgroupfs::try_children(&t.dir) else {
            continue;
        };
        for instance in instances {
            for (file, dir_ino) in pids_files(&instance, cgroup2, v1) {
                let known = seen.get(&file).filter(|s| s.dir_ino == dir_ino).cloned();
                let Some(s) = known else {
                    // New (or recreated): written at the next sweep.
                    seen.insert(
                        file,
                        Seen {
                            dir_ino,
                            type_dir: t.dir.clone(),
                            fresh: true,
                            ours: None,
                        },
                    );
                    continue;
                };
                if !s.fresh && !recheck {
                    continue;
                }
                if let Some(ours) = apply(&file, t.backstop, s.ours) {
                    changed |= ours != s.ours;
                    seen.insert(
                        file,
                        Seen {
                            fresh: false,
                            ours,
                            ..s
                        },
                    );
                }
            }
        }
    }
    // Files gone with their directory are forgotten; those of a type no longer in the policy
    // get back what was there before.
    let dirs: Vec<&Path> = types.iter().map(|t| t.dir.as_path()).collect();
    seen.retain(|file, s| {
        if !file.exists() {
            changed |= s.ours.is_some();
            return false;
        }
        if dirs.contains(&s.type_dir.as_path()) {
            return true;
        }
        if s.ours.is_some() {
            changed = true;
            apply(file, None, s.ours);
        }
        false
    });
    changed
}

/// Reads and, where it must, writes one `pids.max`; returns what to remember (`None`: it could
/// not be read or written, tried again at the next sweep).
fn apply(file: &Path, want: Option<u64>, ours: Option<Written>) -> Option<Option<Written>> {
    let current = PidsMax::parse(&std::fs::read_to_string(file).ok()?)?;
    let (write, remember) = decide(current, want, ours);
    if let Some(value) = write {
        if let Err(e) = std::fs::write(file, value.text()) {
            tracing::debug!(
                "backstop: cannot write {} to {}: {e}",
                value.text(),
                file.display()
            );
            return None;
        }
        tracing::debug!(
            "backstop: {} {} -> {}",
            file.display(),
            current.text(),
            value.text()
        );
    }
    Some(remember)
}

fn load() -> HashMap<PathBuf, Seen> {
    std::fs::read(STATE)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Keeps only the limits the backstop wrote (what `uninstall` and a restarted daemon need).
fn save(seen: &HashMap<PathBuf, Seen>) {
    let ours: HashMap<&PathBuf, &Seen> = seen.iter().filter(|(_, s)| s.ours.is_some()).collect();
    if let Ok(text) = serde_json::to_vec(&ours) {
        let _ = std::fs::write(STATE, text);
    }
}

/// `uninstall`: every limit the backstop wrote that still reads so gets back what was there
/// before. Returns how many.
pub fn give_back_all() -> usize {
    let seen = load();
    let given = seen
        .iter()
        .filter(|(file, s)| {
            let same_dir = file
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
                .is_some_and(|m| m.ino() == s.dir_ino);
            same_dir && s.ours.is_some() && apply(file, None, s.ours) == Some(None)
        })
        .count();
    let _ = std::fs::remove_file(STATE);
    given
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_only_lowers_and_gives_back_only_its_own() {
        use PidsMax::{At, Max};
        // No limit there: ours.
        let (w, r) = decide(Max, Some(30), None);
        assert_eq!(w, Some(At(30)));
        let ours = r.unwrap();
        // A lower one that systemd, runc or podman set stays theirs.
        assert_eq!(decide(At(20), Some(30), None), (None, None));
        // A policy raising max_tasks raises ours, at most back to what was there.
        assert_eq!(
            decide(At(30), Some(40), Some(ours)).0,
            Some(At(40)),
            "raised with the policy"
        );
        let from_50 = decide(At(50), Some(30), None).1.unwrap();
        assert_eq!(decide(At(30), Some(60), Some(from_50)).0, Some(At(50)));
        // The type goes to audit (or away): what was there before comes back.
        assert_eq!(decide(At(30), None, Some(ours)), (Some(Max), None));
        // Lowered by someone since: theirs. Raised over ours: lowered again.
        assert_eq!(decide(At(25), Some(30), Some(ours)), (None, None));
        assert_eq!(decide(Max, Some(30), Some(ours)).0, Some(At(30)));
        // A budget the kernel cannot take as a pids.max: none written.
        assert_eq!(decide(Max, Some(PID_MAX_LIMIT + 1), None), (None, None));
    }

    #[test]
    fn pids_max_reads_as_the_kernel_writes_it() {
        assert_eq!(PidsMax::parse("max\n"), Some(PidsMax::Max));
        assert_eq!(PidsMax::parse("30\n"), Some(PidsMax::At(30)));
        assert_eq!(PidsMax::parse("x"), None);
        assert_eq!(PidsMax::At(7).text(), "7");
    }
}
