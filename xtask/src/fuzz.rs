//! `cargo xtask fuzz`: the cargo-fuzz (libFuzzer) targets of `fuzz/`, built once with
//! AddressSanitizer (rustup's stable rustc with `RUSTC_BOOTSTRAP=1`: Debian's rustc, which
//! builds the eBPF object, has no ASan runtime), then each run for a bounded time with a
//! malloc limit. `cargo xtask test` runs each for `CI_SECONDS`. RELIABILITY.md has the
//! figures.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// cargo-fuzz's version, installed by `setup` when missing.
pub const CARGO_FUZZ_VERSION: &str = "0.13.1";
/// Every target, in the order they run.
pub const TARGETS: &[&str] = &["policy", "control", "btf", "events", "maps"];
/// Each target's run in `cargo xtask test`.
pub const CI_SECONDS: u64 = 20;
/// libFuzzer's `-malloc_limit_mb`: one allocation larger than this is a crash (ASan's
/// allocator reports it), so a size read from the input cannot make one unbounded.
const MALLOC_LIMIT_MB: u32 = 256;
/// The toolchain with an ASan runtime (`librustc-stable_rt.asan.a`).
const TOOLCHAIN: &str = "stable";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// What one target's run did.
pub struct Run {
    pub executions: u64,
    pub corpus: usize,
    pub seconds: f64,
}

/// "20", "20s", "5m", "1h" as seconds.
pub fn parse_time(text: &str) -> Result<u64> {
    let (n, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = n.parse().with_context(|| format!("not a time: {text:?}"))?;
    Ok(match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("not a time: {text:?} (e.g. 20s, 5m, 1h)"),
    })
}

fn target_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz")
}

/// Builds every target once (ASan, optimized, debug assertions and overflow checks on). The eBPF objects are the
/// ones the workspace's release build made (the fuzz targets never load them): no second eBPF
/// build.
pub fn build(root: &Path) -> Result<()> {
    let started = Instant::now();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        // Its default: optimized, with debug assertions and overflow checks.
        .args(["fuzz", "build", "--sanitizer", "address"])
        .arg("--fuzz-dir")
        .arg(root.join("fuzz"))
        .arg("--target-dir")
        .arg(target_dir(root))
        .env("RUSTUP_TOOLCHAIN", TOOLCHAIN)
        .env("RUSTC_BOOTSTRAP", "1")
        // The xtask's own cargo would otherwise pick the workspace's rustc.
        .env_remove("RUSTC")
        .env_remove("CARGO");
    for (var, object) in [
        ("SPAWNGUARD_EBPF_OBJECT", "spawnguard.bpf.o"),
        (
            "SPAWNGUARD_EBPF_EMULATED_ATOMICS_OBJECT",
            "spawnguard-emulated-atomics.bpf.o",
        ),
    ] {
        cmd.env(var, built_object(root, object)?);
    }
    // Into a log, not the terminal: `cargo xtask test` builds while its end-to-end suite runs.
    std::fs::create_dir_all(target_dir(root))?;
    let log_path = target_dir(root).join("build.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let status = cmd
        .status()
        .context("running cargo fuzz (cargo xtask setup installs it)")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        bail!(
            "building the fuzz targets failed: {status} (log: {})",
            log_path.display()
        );
    }
    println!(
        "fuzz: built {} targets in {:.0} s",
        TARGETS.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The newest eBPF object of the workspace's release build.
fn built_object(root: &Path, name: &str) -> Result<PathBuf> {
    let build = root.join("target/release/build");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&build).with_context(|| format!("reading {build:?}"))? {
        let path = entry?.path().join("out").join(name);
        if let Ok(modified) = path.metadata().and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path));
            }
        }
    }
    newest
        .map(|(_, p)| p)
        .with_context(|| format!("no {name} under {build:?}: run `cargo xtask build` first"))
}

/// Runs `target` for `seconds` on its working corpus (target/fuzz/corpus/NAME, kept between
/// runs; libFuzzer adds new inputs there only) and its committed seeds (fuzz/seeds/NAME). A crash fails it, naming the input file.
pub fn run(root: &Path, target: &str, seconds: u64) -> Result<Run> {
    let dir = target_dir(root);
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&corpus)?;
    // A crash file of an earlier run is not this run's.
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts)?;
    let bin = dir.join(TRIPLE).join("release").join(target);
    let mut seed_dirs = vec![seeds.clone()];
    if target == "policy" {
        // The snapshotted invalid policies of the policy tests are seeds too.
        seed_dirs.push(root.join("spawnguard-userspace/tests/policy-corpus"));
    }
    let started = Instant::now();
    let out = Command::new(&bin)
        .arg(&corpus)
        .args(&seed_dirs)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {bin:?} (built by `cargo xtask fuzz`)"))?;
    let seconds = started.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr);
    let crashes: Vec<PathBuf> = std::fs::read_dir(&artifacts)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if !out.status.success() || !crashes.is_empty() {
        // The end of libFuzzer's log holds the panic or the sanitizer's report.
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        for c in &crashes {
            let bytes = std::fs::read(c).unwrap_or_default();
            eprintln!(
                "fuzz: {target}: crash input {} ({} bytes): {:?}",
                c.display(),
                bytes.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(2048)])
            );
        }
        bail!(
            "fuzz target {target} failed ({}); reproduce with {} {}",
            out.status,
            bin.display(),
            crashes
                .first()
                .map_or("".into(), |c| c.display().to_string())
        );
    }
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let run = Run {
        executions: stat("number_of_executed_units"),
        corpus: std::fs::read_dir(&corpus)?.count(),
        seconds,
    };
    println!(
        "fuzz: {target}: {} executions in {:.0} s ({:.0}/s), no crash; working corpus {} inputs, \
         {} seeds",
        run.executions,
        run.seconds,
        run.executions as f64 / run.seconds.max(0.001),
        run.corpus,
        std::fs::read_dir(&seeds).map_or(0, |d| d.count())
    );
    Ok(run)
}

/// Builds, then runs `targets` (every one when empty) for `seconds` each, two at a time;
/// every target runs even when one fails. Returns (passed, failed).
pub fn fuzz(root: &Path, targets: &[String], seconds: u64) -> Result<(u64, u64)> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?} (targets: {})", TARGETS.join(", "));
        }
    }
    build(root)?;
    let all: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    let chosen = if targets.is_empty() { &all } else { targets };
    let (mut passed, mut failed) = (0, 0);
    // Two at a time: each target is one process on one CPU, and CI has two.
    for pair in chosen.chunks(2) {
        let results: Vec<Result<Run>> = std::thread::scope(|scope| {
            let runs: Vec<_> = pair
                .iter()
                .map(|t| scope.spawn(move || run(root, t, seconds)))
                .collect();
            runs.into_iter()
                .map(|h| h.join().expect("a fuzz run's thread"))
                .collect()
        });
        for r in results {
            match r {
                Ok(_) => passed += 1,
                Err(e) => {
                    eprintln!("fuzz: {e:#}");
                    failed += 1;
                }
            }
        }
    }
    println!("fuzz: {passed} targets passed, {failed} failed");
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("20").unwrap(), 20);
        assert_eq!(parse_time("20s").unwrap(), 20);
        assert_eq!(parse_time("5m").unwrap(), 300);
        assert_eq!(parse_time("1h").unwrap(), 3600);
        assert!(parse_time("1d").is_err());
        assert!(parse_time("h").is_err());
    }
}
