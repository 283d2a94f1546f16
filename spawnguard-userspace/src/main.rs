//! `spawnguard`: the daemon that loads the kernel enforcer, and the CLI around it. Parses the
//! command line and dispatches to `cli`; the work is the library's (`spawnguard`).

mod cli;

use std::{ffi::OsString, process::ExitCode};

use clap::Parser;

fn main() -> ExitCode {
    // `spawnguard gate TYPE` sits in a runtime's spawn path: answered before the command line
    // parser and logging are set up (together they cost a third of a millisecond).
    let args: Vec<OsString> = std::env::args_os().collect();
    if let [_, verb, type_name] = args.as_slice() {
        if verb == "gate" && !type_name.to_string_lossy().starts_with('-') {
            return cli::gate(&type_name.to_string_lossy());
        }
    }
    let cli = cli::Cli::parse();
    if cli.command.logs() {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spawnguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
