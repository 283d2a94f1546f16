//! The floors' eBPF object for `sg-bench` (bpf/floors.bpf.c), built with clang-22 (`cargo xtask
//! setup` installs it).

use std::{env, path::PathBuf, process::Command};

fn main() {
    let src = "bpf/floors.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("floors.bpf.o");
    let status = Command::new("clang-22")
        .args(["-O2", "-g", "-target", "bpf", "-c", src, "-o"])
        .arg(&out)
        .status()
        .expect("clang-22 builds the bench's floor programs (cargo xtask setup installs it)");
    assert!(status.success(), "clang-22 failed on {src}");
}
