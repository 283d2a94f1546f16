//! Builds the eBPF object (spawnguard-ebpf for bpfel-unknown-none) with Debian's rustc and
//! embeds it in the binary: one file to install. The toolchain itself is installed by
//! `cargo xtask setup` (see shared/TOOLCHAIN.md for why it is Debian's rustc).

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

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
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    // Two builds of the same programs: with atomic fetch and compare-and-swap instructions
    // (kernel >= 5.12), and with them emulated for 5.10-5.11 (feature `emulated-atomics`).
    let objects = [
        Flavour {
            object: "spawnguard.bpf.o",
            target_dir: "ebpf-target",
            prebuilt: "SPAWNGUARD_EBPF_OBJECT",
            features: &[],
            // v3: atomic fetch-and-add and compare-and-swap.
            rustflags: "-Ctarget-cpu=v3",
        },
        Flavour {
            object: "spawnguard-emulated-atomics.bpf.o",
            target_dir: "ebpf-target-emulated-atomics",
            prebuilt: "SPAWNGUARD_EBPF_EMULATED_ATOMICS_OBJECT",
            features: &["--features", "emulated-atomics"],
            // Still v3 (32-bit jumps, 5.1): only the atomic instructions are avoided.
            rustflags: "-Ctarget-cpu=v3",
        },
    ];
    let mut builds = Vec::new();
    let path = ebpf_path();
    if objects.iter().any(|f| env::var_os(f.prebuilt).is_none()) {
        watch_tools(&path);
    }
    for flavour in &objects {
        println!("cargo:rerun-if-env-changed={}", flavour.prebuilt);
        let object = out.join(flavour.object);
        if let Ok(prebuilt) = env::var(flavour.prebuilt) {
            std::fs::copy(&prebuilt, &object)
                .unwrap_or_else(|e| panic!("copy {} {prebuilt}: {e}", flavour.prebuilt));
            continue;
        }
        if !std::path::Path::new(DEBIAN_RUSTC).exists() {
            panic!(
                "{DEBIAN_RUSTC} not found: the eBPF programs need Debian's rustc and rust-src. \
                 Run `cargo xtask setup` (as root) first."
            );
        }
        let target_dir = out.join(flavour.target_dir);
        let child = ebpf_build(&root, &target_dir, &path, flavour)
            .spawn()
            .expect("run cargo for the eBPF build");
        builds.push((child, target_dir, object, flavour));
    }
    // Both at once: they share nothing but the CPUs.
    for (mut child, target_dir, object, flavour) in builds {
        let status = child.wait().expect("wait for the eBPF build");
        if !status.success() {
            panic!(
                "building the eBPF object {} failed (see the cargo output above)",
                flavour.object
            );
        }
        let built = target_dir.join("bpfel-unknown-none/release/spawnguard");
        std::fs::copy(&built, &object).expect("copy the eBPF object");
    }
}

struct Flavour {
    object: &'static str,
    target_dir: &'static str,
    /// An environment variable naming a prebuilt object to embed instead.
    prebuilt: &'static str,
    features: &'static [&'static str],
    /// CARGO_ENCODED_RUSTFLAGS (0x1f-separated).
    rustflags: &'static str,
}

/// PATH for the eBPF build: ours, then cargo's bin directory (where `cargo install` put
/// bpf-linker).
fn ebpf_path() -> OsString {
    let mut path = env::var_os("PATH").unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME")
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string()))
    {
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.push(PathBuf::from(home).join("bin"));
        path = env::join_paths(paths).unwrap();
    }
    path
}

/// The programs are rebuilt when the compiler or the linker that built them changes (a
/// toolchain upgrade changes the object without a source change). Not on a change of PATH
/// itself: it differs between shells, and the build takes minutes.
fn watch_tools(path: &OsString) {
    let linker = env::split_paths(path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file());
    for tool in std::iter::once(PathBuf::from(DEBIAN_RUSTC)).chain(linker) {
        println!("cargo:rerun-if-changed={}", tool.display());
        // A symlink (update-alternatives, a toolchain manager's shim) changes at its target.
        if let Ok(real) = tool.canonicalize() {
            if real != tool {
                println!("cargo:rerun-if-changed={}", real.display());
            }
        }
    }
}

fn ebpf_build(root: &Path, target_dir: &Path, path: &OsString, flavour: &Flavour) -> Command {
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
        ])
        .args(flavour.features)
        .arg("--target-dir")
        .arg(target_dir)
        .env("PATH", path)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", flavour.rustflags);
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
    cmd
}
