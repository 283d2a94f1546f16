//! `spawnguard doctor`: what this host offers spawnguard.

use std::process::ExitCode;

use anyhow::Result;
use spawnguard::doctor::{self, Level, Report};

use super::Output;

pub fn run(output: Output) -> Result<ExitCode> {
    let report = doctor::run();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report),
    }
    Ok(if report.can_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(r: &Report) {
    println!("{:<18} {:<6} DETAIL", "CHECK", "STATUS");
    for c in &r.checks {
        let level = match c.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fatal => "FATAL",
        };
        println!("{:<18} {:<6} {}", c.name, level, c.detail);
    }
    println!();
    match &r.backend {
        Some(b) => println!("backend `auto` would choose: {b}: {}", r.backend_reason),
        None => println!("{}", r.backend_reason),
    }
    let advice: Vec<_> = r
        .checks
        .iter()
        .filter_map(|c| Some((c.name.as_str(), c.advice.as_deref()?)))
        .collect();
    if !advice.is_empty() {
        println!("\nadvice:");
        for (name, a) in advice {
            println!("  {name}: {a}");
        }
    }
}
