//! `spawnguard gate TYPE`: would a new instance be admitted now (exit 0), or why not (exit 1;
//! 2 when it cannot tell). Answered before clap parses anything: it sits in a spawn path.

use std::process::ExitCode;

use spawnguard::gate::{self, Verdict};

pub fn gate(type_name: &str) -> ExitCode {
    match gate::check(type_name) {
        Ok(Verdict::Admitted) => {
            println!("ok: a new {type_name} instance would be admitted now");
            ExitCode::SUCCESS
        }
        Ok(Verdict::Refused(why)) => {
            println!("no: {why}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("spawnguard: {e}");
            ExitCode::from(2)
        }
    }
}
