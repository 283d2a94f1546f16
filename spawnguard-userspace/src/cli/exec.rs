//! `spawnguard exec`: run a command as (part of) an agent instance.

use std::{ffi::OsString, os::unix::process::CommandExt, path::Path, process::ExitCode};

use anyhow::{anyhow, bail, Result};
use spawnguard::{
    cgroupfs::{self, Cgroup2},
    loader::DaemonState,
    policy::Policy,
};

/// `spawnguard exec`: runs CMD in the instance cgroup as a child process, waits outside the
/// instance, and removes the instance directory afterwards if it created it and it is empty.
/// With `keep`, moves this process into the instance and becomes CMD: only returns on error.
pub fn run(
    type_name: &str,
    instance: &str,
    policy: Option<&Path>,
    keep: bool,
    command: &[OsString],
) -> Result<ExitCode> {
    if instance.is_empty() || instance.contains('/') || instance.starts_with('.') {
        bail!("--instance must be a plain directory name, got {instance:?}");
    }
    let type_dir = match (policy, DaemonState::read()) {
        (Some(p), _) => {
            let policy = Policy::from_file(p)?;
            let t = policy
                .type_named(type_name)
                .ok_or_else(|| anyhow!("no type {type_name:?} in {}", p.display()))?;
            Cgroup2::discover()?.dir(&t.path)
        }
        (None, Some(state)) => state
            .types
            .iter()
            .find(|t| t.name == type_name)
            .map(|t| t.dir.clone())
            .ok_or_else(|| anyhow!("the running daemon has no type {type_name:?}"))?,
        (None, None) => {
            let policy = Policy::default_policy();
            let t = policy.type_named(type_name).ok_or_else(|| {
                anyhow!("no daemon is running and the default policy has no type {type_name:?}")
            })?;
            Cgroup2::discover()?.dir(&t.path)
        }
    };
    let dir = type_dir.join(instance);
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    if keep {
        cgroupfs::ensure_dir(&dir)?;
        cgroupfs::move_process(&dir, std::process::id())?;
        let e = cmd.exec();
        bail!("cannot run {:?}: {e}", command[0]);
    }
    let created = cgroupfs::create_dir(&dir)?;
    let status = match cgroupfs::run_in(&dir, &mut cmd) {
        Ok(status) => status,
        Err(e) => {
            if created {
                // Nothing ever ran in it.
                let _ = cgroupfs::remove_empty(&dir, std::time::Duration::from_secs(2));
            }
            return Err(e.into());
        }
    };
    if created {
        if let Err(why) = cgroupfs::remove_empty(&dir, std::time::Duration::from_secs(2)) {
            eprintln!("spawnguard exec: kept {}: {why}", dir.display());
        }
    }
    Ok(ExitCode::from(cgroupfs::shell_exit_code(status)))
}
