//! `spawnguard breaker`: the per-type circuit breakers.

use std::process::ExitCode;

use anyhow::Result;
use spawnguard::{
    breaker,
    client::{self, Fallback, Route},
    control::{self, BreakerAnswer, Request},
    daemon,
};

use super::{BreakerCommand, Output};

/// Changes go through the daemon when it runs (it logs them), and straight to the pinned maps
/// when none runs; the status is read from the pinned maps.
pub fn run(command: BreakerCommand) -> Result<ExitCode> {
    let request = match &command {
        BreakerCommand::Status { type_name, output } => {
            let views = breaker::status(type_name.as_deref())?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
                Output::Table => {
                    for v in &views {
                        println!("{}", breaker::describe(v));
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        BreakerCommand::Open {
            type_name,
            duration,
            reason,
        } => Request::BreakerOpen {
            type_name: type_name.clone(),
            for_ms: duration.map(|d| d.as_millis() as u64),
            reason: reason.clone(),
        },
        BreakerCommand::Close { type_name } => Request::BreakerClose {
            type_name: type_name.clone(),
        },
        BreakerCommand::ReportFailure { type_name, reason } => Request::BreakerReportFailure {
            type_name: type_name.clone(),
            reason: reason.clone(),
        },
    };
    let answer: BreakerAnswer =
        match client::route(Fallback::WhenNotRunning, control::ask(&request))? {
            Route::Daemon(answer) => answer,
            Route::Pinned(_) => daemon::breaker_request(&request)?,
        };
    println!("{}", breaker::describe(&answer.breaker));
    Ok(ExitCode::SUCCESS)
}
