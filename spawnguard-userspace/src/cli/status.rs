//! `spawnguard status`: per type, instances against ceilings, tasks against budgets, denials.

use std::process::ExitCode;

use anyhow::{bail, Result};
use spawnguard::{
    breaker,
    client::{self, Fallback, Route},
    control::{self, Request},
    status::{self, or_dash, MapUsage, Status},
};

use super::Output;

pub fn run(type_name: Option<String>, output: Output) -> Result<ExitCode> {
    let mut s = match client::route(Fallback::WhenUnanswered, control::ask(&Request::Status))? {
        Route::Daemon(answer) => answer,
        Route::Pinned(why) => {
            if let Some(e) = why {
                eprintln!("spawnguard: the daemon did not answer ({e:#}); reading the pinned maps");
            }
            status::read()?
        }
    };
    if let Some(t) = &type_name {
        if !s.types.iter().any(|x| &x.name == t) {
            bail!("no type {t:?} in the policy in force");
        }
        s.types.retain(|x| &x.name == t);
        s.instances.retain(|i| &i.type_name == t);
    } else if output == Output::Table {
        s.instances.clear();
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print_table(&s),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(s: &Status) {
    match s.daemon_pid {
        Some(pid) => println!(
            "daemon pid {pid}, backend {}",
            s.backend.as_deref().unwrap_or("?")
        ),
        None => println!(
            "daemon not running: the pinned enforcer keeps enforcing its last policy; these \
             figures are read from its maps"
        ),
    }
    match s.host.max_tasks {
        Some(max) => println!(
            "host: {} tasks in instances, budget {max} (denying above {})",
            s.host.tasks,
            or_dash(s.host.deny_tasks)
        ),
        None => println!("host: {} tasks in instances, no host budget", s.host.tasks),
    }
    println!(
        "{:<16} {:<8} {:>11} {:>13} {:>9} {:>8} {:>9} {:>11} {:>8}",
        "TYPE",
        "MODE",
        "INSTANCES",
        "TASKS",
        "PROCESSES",
        "THREADS",
        "MAX_TASKS",
        "MAX_THREADS",
        "DENIED"
    );
    for t in &s.types {
        println!(
            "{:<16} {:<8} {:>11} {:>13} {:>9} {:>8} {:>9} {:>11} {:>8}",
            t.name,
            t.mode,
            format!("{}/{}", t.instances, or_dash(t.max_instances)),
            format!("{}/{}", t.tasks, or_dash(t.max_total_tasks)),
            t.processes,
            t.threads,
            t.max_tasks,
            t.max_threads,
            t.denied.total()
        );
        for (reason, n) in t.denied.by_reason() {
            if n > 0 {
                println!("  denied by {reason}: {n}");
            }
        }
        if let Some(b) = &t.breaker {
            println!("  breaker {}", breaker::describe(b));
        }
    }
    if !s.instances.is_empty() {
        println!();
        println!(
            "{:<40} {:<16} {:>7} {:>9} {:>8} {:>9}",
            "INSTANCE", "TYPE", "TASKS", "PROCESSES", "THREADS", "AGE"
        );
        for i in &s.instances {
            println!(
                "{:<40} {:<16} {:>7} {:>9} {:>8} {:>8.0}s",
                i.path, i.type_name, i.tasks, i.processes, i.threads, i.age_seconds
            );
        }
    }
    for w in s.maps.iter().filter_map(MapUsage::warning) {
        println!("\nwarning: {w}");
    }
    if s.events_dropped + s.failed_open > 0 {
        println!(
            "\nevents dropped: {}, tasks let through uncounted (fail-open): {}",
            s.events_dropped, s.failed_open
        );
    }
}
