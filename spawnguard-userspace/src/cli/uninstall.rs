//! `spawnguard uninstall`: detach and remove the pinned enforcer.

use std::process::ExitCode;

use anyhow::{Context, Result};
use spawnguard::{backstop, daemon, loader};

use super::Output;

pub fn run(output: Output) -> Result<ExitCode> {
    loader::preflight()?;
    let _lock = daemon::single_daemon_lock()
        .context("stop the daemon before uninstalling (it would reinstall)")?;
    let removed = loader::uninstall()?;
    let _ = std::fs::remove_file(loader::STATE_FILE);
    // The pids.max limits the backstop wrote go back to what was there before.
    backstop::give_back_all();
    match (output, removed) {
        (Output::Json, _) => println!("{}", serde_json::json!({ "removed": removed })),
        (Output::Table, true) => {
            println!("spawnguard removed from the kernel: nothing is enforced any more");
        }
        (Output::Table, false) => println!("spawnguard is not installed"),
    }
    Ok(ExitCode::SUCCESS)
}
