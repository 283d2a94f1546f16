//! Counting the agents that already run, when the enforcer is installed and when a policy
//! change adds a type.

use std::path::Path;

use anyhow::Result;
use aya::maps::HashMap;
use spawnguard_common::maps;

use super::{open_pinned, Enforcer, PlacedType};
use crate::{cgroupfs, host, policy::Policy};

impl Enforcer {
    /// Puts `policy` in force over a running enforcer. The agents already running in the
    /// instances of a type it adds are counted first, in audit mode, as at install: from then
    /// on they are held to their budget, and none is stopped for having run before the type
    /// existed. Returns how many processes were counted so.
    pub fn put_in_force(&self, policy: &Policy, types: &mut [PlacedType]) -> Result<usize> {
        let in_force = self.types_in_force()?;
        let added: Vec<String> = types
            .iter()
            .filter(|t| !in_force.iter().flatten().any(|n| *n == t.name))
            .map(|t| t.name.clone())
            .collect();
        let mut counted = 0;
        if !added.is_empty() {
            self.apply_policy(policy, types, &added)?;
            let new: Vec<PlacedType> = types
                .iter()
                .filter(|t| added.contains(&t.name))
                .cloned()
                .collect();
            counted = reconcile(&self.dir, &new)?;
        }
        self.apply_policy(policy, types, &[])?;
        Ok(counted)
    }
}

/// Counts the agents that already run: each process in an instance is written back into its
/// own cgroup, which fires the migration hook for it (the kernel moves nothing). The hook
/// counts the whole process, exactly as if it had just moved in; processes forked meanwhile are
/// already counted and skipped. Returns how many processes were written.
pub(super) fn reconcile(dir: &Path, types: &[PlacedType]) -> Result<usize> {
    let mut created: HashMap<_, u64, u64> = HashMap::try_from(open_pinned(dir, maps::CREATED)?)?;
    let (now_mono, now_wall) = (host::monotonic_ns(), std::time::SystemTime::now());
    let mut count = 0;
    for t in types {
        for inst in cgroupfs::children(&t.dir) {
            // Age counts from the instance's creation, also for instances older than us (the
            // directory's time is the best guess there is for those).
            if let (Ok(id), Ok(meta)) = (cgroupfs::cgroup_id(&inst), std::fs::metadata(&inst)) {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| now_wall.duration_since(m).ok())
                    .map_or(0, |d| d.as_nanos() as u64);
                let _ = created.insert(id, now_mono.saturating_sub(age), BPF_NOEXIST);
            }
            for cg in cgroupfs::subtree(&inst) {
                for pid in cgroupfs::procs(&cg) {
                    if cgroupfs::move_process(&cg, pid).is_ok() {
                        count += 1;
                    }
                }
            }
        }
    }
    Ok(count)
}

const BPF_NOEXIST: u64 = 1;
