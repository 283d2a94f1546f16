//! `spawnguard doctor`: what this host offers spawnguard.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use spawnguard::{
    doctor::{self, Level, Report},
    loader::{self, Backend, BackendChoice, StepsFrom},
};

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

/// `doctor --verifier-steps`: each program's verifier steps for one backend.
pub fn verifier_steps(
    output: Output,
    choice: BackendChoice,
    from: Option<StepsFrom>,
) -> Result<ExitCode> {
    loader::preflight()?;
    let backend = match choice {
        BackendChoice::Lsm => Backend::Lsm,
        BackendChoice::Kill => Backend::Kill,
        BackendChoice::KillCompat => Backend::KillCompat,
        BackendChoice::Auto => {
            let report = doctor::run();
            let Some(name) = report.backend else {
                bail!("{}", report.backend_reason);
            };
            [Backend::Lsm, Backend::Kill, Backend::KillCompat]
                .into_iter()
                .find(|b| b.name() == name)
                .with_context(|| format!("doctor chose an unknown backend {name}"))?
        }
    };
    let steps = loader::verifier_steps(backend, from.unwrap_or_else(StepsFrom::for_this_kernel))?;
    let over = steps.over_half_the_limit();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&steps)?),
        Output::Table => {
            println!(
                "kernel {}, backend {}{}, from {}",
                steps.kernel,
                steps.backend,
                if steps.emulated_atomics {
                    " (emulated atomics)"
                } else {
                    ""
                },
                match steps.from {
                    StepsFrom::ProgInfo => "bpf_prog_info.verified_insns",
                    StepsFrom::Log => "the verifier's log",
                }
            );
            println!("{:<20} {:>9} {:>9}", "PROGRAM", "STEPS", "OF LIMIT");
            for p in &steps.programs {
                println!(
                    "{:<20} {:>9} {:>8.1}%",
                    p.program,
                    p.steps,
                    p.steps as f64 * 100.0 / steps.limit as f64
                );
            }
            let total: u64 = steps.programs.iter().map(|p| p.steps).sum();
            println!("{:<20} {:>9}", "all programs", total);
        }
    }
    for p in &over {
        eprintln!(
            "spawnguard: {} took {} verifier steps, half or more of the kernel's limit of {}",
            p.program, p.steps, steps.limit
        );
    }
    Ok(if over.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
