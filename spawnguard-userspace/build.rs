//! Builds the eBPF object (spawnguard-ebpf for bpfel-unknown-none) with Debian's rustc and
//! embeds it in the binary: one file to install. The toolchain itself is installed by
//! `cargo xtask setup` (see shared/TOOLCHAIN.md for why it is Debian's rustc).

use std::{env, path::PathBuf, process::Command};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for dir in ["spawnguard-ebpf/src", "spawnguard-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("spawnguard-ebpf/Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=SPAWNGUARD_EBPF_OBJECT");

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let object = out.join("spawnguard.bpf.o");
    if let Ok(prebuilt) = env::var("SPAWNGUARD_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &object).expect("copy SPAWNGUARD_EBPF_OBJECT");
        return;
    }
    if !std::path::Path::new(DEBIAN_RUSTC).exists() {
        panic!(
            "{DEBIAN_RUSTC} not found: the eBPF programs need Debian's rustc and rust-src. \
             Run `cargo xtask setup` (as root) first."
        );
    }
    let target_dir = out.join("ebpf-target");
    let mut path = env::var_os("PATH").unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME")
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string()))
    {
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.push(PathBuf::from(home).join("bin"));
        path = env::join_paths(paths).unwrap();
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root.join("spawnguard-ebpf"))
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--bin",
            "spawnguard",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("PATH", path)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        // v3: atomic fetch-and-add and compare-and-swap (kernel >= 5.12).
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-cpu=v3");
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the eBPF build");
    if !status.success() {
        panic!("building the eBPF object failed (see the cargo output above)");
    }
    let built = target_dir.join("bpfel-unknown-none/release/spawnguard");
    std::fs::copy(&built, &object).expect("copy the eBPF object");
}
