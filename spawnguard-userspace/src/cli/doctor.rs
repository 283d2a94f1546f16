//! `spawnguard doctor`: what this host offers spawnguard.

use std::process::ExitCode;

use anyhow::Result;
use spawnguard::doctor;

use super::Output;

pub fn run(output: Output) -> Result<ExitCode> {
    let report = doctor::run();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => doctor::print_table(&report),
    }
    Ok(if report.can_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
