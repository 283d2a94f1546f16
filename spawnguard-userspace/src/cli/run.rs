//! `spawnguard run`: the daemon, in the foreground.

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use spawnguard::{
    daemon,
    policy::{self, Policy},
};

pub fn run(opts: daemon::Options) -> Result<ExitCode> {
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
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the policy file {}", p.display()))?;
            (Policy::parse(&text, &p.display().to_string())?, text)
        }
        None => (Policy::default_policy(), policy::DEFAULT_POLICY.to_owned()),
    })
}
