//! `cargo xtask verifier-steps [--record]`: this kernel's verifier steps per backend and program
//! against `tests/verifier-steps.toml` (the record `tests/tests/verifier_steps.rs` guards), or
//! recorded into it. Both atomics flavours are measured: the object with the atomic
//! instructions, and the one that emulates them (kernels before 5.12; the host's second test
//! pass), as `SPAWNGUARD_EMULATED_ATOMICS` picks.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, Context, Result};

/// Kernel release → backend key → program → steps.
type Record = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;

const RECORD: &str = "tests/verifier-steps.toml";
const HEADER: &str = "\
# Verifier steps per program (instructions the kernel's verifier processed to accept it):
# kernel release, then backend (`+emulated-atomics`: the object kernels before 5.12 load), then
# program. Exact for one kernel, backend and build. `cargo xtask test` fails when a program
# grows more than 20 % over its figure here (tests/tests/verifier_steps.rs).
# Written by `cargo xtask verifier-steps --record` (as root, under the host lock); a kernel's
# section is replaced whole, the others are kept.
";

pub fn run(root: &Path, record: bool) -> Result<()> {
    let bin = root.join("target/release/spawnguard");
    let path = root.join(RECORD);
    let mut recorded: Record = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("parsing {RECORD}"))?,
        Err(_) => Record::new(),
    };
    let mut kernel = String::new();
    let mut now: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for emulated in ["0", "1"] {
        for backend in ["lsm", "kill", "kill-compat"] {
            let out = Command::new(&bin)
                .args(["doctor", "--verifier-steps", "--backend", backend])
                .args(["--output", "json"])
                .env("SPAWNGUARD_EMULATED_ATOMICS", emulated)
                .output()
                .with_context(|| format!("running {}", bin.display()))?;
            let Ok(steps) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                let err = String::from_utf8_lossy(&out.stderr);
                println!(
                    "{backend} (SPAWNGUARD_EMULATED_ATOMICS={emulated}): not loadable here: {}",
                    err.lines().last().unwrap_or_default()
                );
                continue;
            };
            kernel = steps["kernel"].as_str().context("kernel")?.to_owned();
            let mut key = backend.to_owned();
            if steps["emulated_atomics"] == true {
                key += "+emulated-atomics";
            }
            let programs = steps["programs"].as_array().context("programs")?;
            now.insert(
                key,
                programs
                    .iter()
                    .filter_map(|p| Some((p["program"].as_str()?.to_owned(), p["steps"].as_u64()?)))
                    .collect(),
            );
        }
    }
    if now.is_empty() {
        bail!("no backend's programs loaded here (root is needed)");
    }
    let before = recorded.get(&kernel).cloned().unwrap_or_default();
    println!("kernel {kernel}: steps now (recorded)");
    let mut grown = Vec::new();
    for (key, programs) in &now {
        for (program, n) in programs {
            let was = before.get(key).and_then(|p| p.get(program)).copied();
            let change = was.map_or("not recorded".to_owned(), |w| {
                format!("{w}, {:+.1} %", (*n as f64 / w as f64 - 1.0) * 100.0)
            });
            println!("  {key:<28} {program:<20} {n:>8} ({change})");
            if was.is_some_and(|w| n * 100 > w * 120) {
                grown.push(format!("{program} ({key}): {n}, recorded {}", was.unwrap()));
            }
        }
    }
    if record {
        recorded.insert(kernel.clone(), now);
        std::fs::write(&path, render(&recorded)).with_context(|| format!("writing {RECORD}"))?;
        println!("recorded kernel {kernel} in {RECORD}");
        return Ok(());
    }
    if !grown.is_empty() {
        bail!("grown more than 20 % over the record: {}", grown.join("; "));
    }
    Ok(())
}

fn render(record: &Record) -> String {
    let mut s = HEADER.to_owned();
    for (kernel, backends) in record {
        for (key, programs) in backends {
            s += &format!("\n[\"{kernel}\".\"{key}\"]\n");
            for (program, n) in programs {
                s += &format!("{program} = {n}\n");
            }
        }
    }
    s
}
