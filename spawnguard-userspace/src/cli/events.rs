//! `spawnguard events`: what the kernel reported, from the daemon's backlog or the kernel's ring.

use std::{io::Write, process::ExitCode};

use anyhow::Result;
use spawnguard::{
    client::{self, Fallback, Route},
    control, events,
};

use super::Output;

pub fn run(follow: bool, type_name: Option<String>, output: Output) -> Result<ExitCode> {
    let mut print = |r: events::EventRecord| -> Result<()> {
        let mut out = std::io::stdout().lock();
        match output {
            Output::Json => writeln!(out, "{}", serde_json::to_string(&r)?)?,
            Output::Table => writeln!(out, "{} {:<12} {}", r.time, r.kind, r.message)?,
        }
        // A reader at the other end of a pipe sees each event as it happens.
        out.flush()?;
        Ok(())
    };
    // Reading the ring consumes it: only when no daemon runs, which would miss what is read.
    let from_daemon = control::follow_events(follow, type_name.clone(), &mut print).map(Ok);
    if let Route::Pinned(_) = client::route(Fallback::WhenNotRunning, from_daemon)? {
        eprintln!(
            "spawnguard: the daemon is not running; reading the kernel's event ring directly \
             (events read here are not seen by a daemon started later)"
        );
        events::read_pinned(follow, type_name.as_deref(), print)?;
    }
    Ok(ExitCode::SUCCESS)
}
