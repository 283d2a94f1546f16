//! `spawnguard policy`: check, apply, show, and print the default.

use std::process::ExitCode;

use anyhow::{Context, Result};
use spawnguard::{
    client,
    control::{PolicyDiff, PolicyShown, Request},
    policy::{self, Policy},
};

use super::{Output, PolicyCommand};

pub fn run(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::Default => print!("{}", policy::DEFAULT_POLICY),
        PolicyCommand::Check { file, output } => match (Policy::from_file(&file), output) {
            (Ok(p), Output::Table) => {
                println!("{}: ok ({} types)", file.display(), p.types.len());
            }
            (Ok(p), Output::Json) => println!(
                "{}",
                serde_json::json!({"ok": true, "file": file, "types": p.types.len()})
            ),
            (Err(e), Output::Table) => return Err(e.into()),
            (Err(e), Output::Json) => {
                println!("{}", serde_json::json!({"ok": false, "error": e}));
                return Ok(ExitCode::FAILURE);
            }
        },
        PolicyCommand::Apply { file, output } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading the policy file {}", file.display()))?;
            let name = file.display().to_string();
            // Validate here first: a bad file never reaches the daemon.
            Policy::parse(&text, &name)?;
            let d: PolicyDiff = client::daemon_only(&Request::PolicyApply { file: name, text })?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
                Output::Table => {
                    println!("applied {}", file.display());
                    for t in &d.added {
                        println!("  + type {t}");
                    }
                    for t in &d.removed {
                        println!("  - type {t}");
                    }
                    for c in &d.changed {
                        println!("  ~ {c}");
                    }
                    if d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty() {
                        println!("  (no changes)");
                    }
                }
            }
        }
        PolicyCommand::Show { output } => {
            let shown: PolicyShown = client::daemon_only(&Request::PolicyShow)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&shown.policy)?),
                Output::Table => print!("{}", shown.text),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
