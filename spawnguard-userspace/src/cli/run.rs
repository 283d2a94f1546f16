//! `spawnguard run`: the daemon, in the foreground.

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use spawnguard::{
    cgroupns::{self, Entered},
    daemon,
    policy::{self, Policy},
};

pub fn run(opts: daemon::Options) -> Result<ExitCode> {
    // First, while this is the only thread (setns moves only the calling one; the runtime's
    // threads inherit it) and before anything reads a cgroup path: in a container with a
    // cgroup namespace of its own (Kubernetes' default on cgroup v2) paths are not the host's.
    if let Entered::Joined { via_pid } = cgroupns::enter_host_namespace()? {
        tracing::info!(
            "joined the host's cgroup namespace (pid {via_pid}'s): this container had one of \
             its own"
        );
    }
    let (parsed, text) = load_policy(opts.policy_file.as_deref())?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(daemon::run(parsed, text, opts))?;
    Ok(ExitCode::SUCCESS)
}

/// The policy to run with, and its text (for `policy show`).
fn load_policy(path: Option<&Path>) -> Result<(Policy, String)> {
    Ok(match path {
        Some(p) => {
            spawnguard::trust::check_policy_file(p)
                .context("refusing to start: the policy file is not safe")?;
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the policy file {}", p.display()))?;
            (Policy::parse(&text, &p.display().to_string())?, text)
        }
        None => (Policy::default_policy(), policy::DEFAULT_POLICY.to_owned()),
    })
}
