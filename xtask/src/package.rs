//! `cargo xtask package`: the Debian package, `target/debian/spawnguard_<version>-1_amd64.deb`
//! (`--revision N`: `-N`),
//! built by `cargo deb --no-build` from the static binary `build_spawnguard` links (what is
//! tested is what ships). Its metadata is `[package.metadata.deb]` in spawnguard-userspace's
//! Cargo.toml; the maintainer scripts, copyright and lintian overrides are in deploy/debian/.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{cargo, run, target_dir};

/// cargo-deb's version, installed by `setup` when missing.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds the package and returns its path.
pub fn package(revision: &str) -> Result<PathBuf> {
    crate::setup()?;
    crate::build_spawnguard()?;
    let target = target_dir()?;
    let (version, maintainer) = metadata()?;
    // Completions, man pages and the changelog, generated where cargo-deb's `target/release/`
    // asset paths point.
    let assets = target.join("release/deb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    run(Command::new(target.join("release/spawnguard"))
        .arg("generate")
        .arg(&assets))?;
    // Compressed, as Debian policy wants man pages (cargo-deb compresses only assets it did
    // not find under target/release/). -n: no name or time stamp in the header (reproducible).
    let mut gzip = Command::new("gzip");
    gzip.arg("-9n");
    for page in std::fs::read_dir(assets.join("man"))? {
        gzip.arg(page?.path());
    }
    run(&mut gzip)?;
    write_changelog(&assets, &version, revision, &maintainer)?;
    run(cargo()
        .args([
            "deb",
            "--package",
            "spawnguard-userspace",
            "--no-build",
            "--deb-revision",
            revision,
            "--output",
        ])
        .arg(target.join("debian")))?;
    let deb = target.join(format!("debian/spawnguard_{version}-{revision}_amd64.deb"));
    if !deb.is_file() {
        bail!("cargo deb did not write {}", deb.display());
    }
    println!("xtask: {}", deb.display());
    Ok(deb)
}

/// The workspace version and the package's maintainer, from Cargo.toml.
fn metadata() -> Result<(String, String)> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed");
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pkg = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "spawnguard-userspace"))
        .context("no spawnguard-userspace package in cargo metadata")?;
    let version = pkg["version"].as_str().context("no version")?.to_owned();
    let maintainer = pkg["metadata"]["deb"]["maintainer"]
        .as_str()
        .context("no [package.metadata.deb] maintainer")?
        .to_owned();
    Ok((version, maintainer))
}

/// `changelog.Debian.gz`: one entry for this version, dated like the last commit (the same
/// sources give the same package).
fn write_changelog(
    dir: &std::path::Path,
    version: &str,
    revision: &str,
    maintainer: &str,
) -> Result<()> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let date = git(&["log", "-1", "--format=%aD"])
        .or_else(|| {
            let out = Command::new("date").arg("-R").output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .context("no date for the changelog")?;
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .map(|c| format!(" (git {c})"))
        .unwrap_or_default();
    let text = format!(
        "spawnguard ({version}-{revision}) unstable; urgency=medium\n\n  \
         * spawnguard {version}{commit}, packaged with cargo-deb.\n\n \
         -- {maintainer}  {date}\n"
    );
    let plain = dir.join("changelog.Debian");
    std::fs::write(&plain, text)?;
    run(Command::new("gzip").args(["-9nf"]).arg(&plain))
}
