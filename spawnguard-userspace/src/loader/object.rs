//! The embedded eBPF objects, and which one this kernel can verify (with or without the atomic
//! instructions).

use aya::VerifierLogLevel;

use crate::host;

/// The eBPF object, built by build.rs and embedded: one file to install.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spawnguard.bpf.o"));
/// The same programs for kernels without the atomic fetch and compare-and-swap instructions:
/// they emulate them (spawnguard-ebpf's `emulated-atomics` feature).
pub(super) static EBPF_OBJECT_EMULATED_ATOMICS: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/spawnguard-emulated-atomics.bpf.o"
));

/// `SPAWNGUARD_EMULATED_ATOMICS=1` loads the emulated-atomics object on any kernel: the test
/// suite runs it on real CPUs that way (the 5.10 guest's two vCPUs share one host thread).
pub const EMULATED_ATOMICS_ENV: &str = "SPAWNGUARD_EMULATED_ATOMICS";

/// Whether to load the emulated-atomics object: this kernel predates the instructions, or the
/// environment asks for it.
pub fn emulated_atomics() -> bool {
    std::env::var(EMULATED_ATOMICS_ENV).is_ok_and(|v| v == "1")
        || host::kernel_older_than(&host::kernel_release(), host::ATOMICS_KERNEL)
}

/// The object this kernel can verify.
pub(super) fn ebpf_object() -> &'static [u8] {
    if emulated_atomics() {
        EBPF_OBJECT_EMULATED_ATOMICS
    } else {
        EBPF_OBJECT
    }
}

/// What the kernel says when it refuses a program: its verdict and statistics, not the trace
/// of every instruction (aya's default). The trace of a 50,000-step program overflows the log
/// buffer, and the kernel then keeps only its start, so the reason was lost.
pub(super) const VERIFIER_LOG: VerifierLogLevel = VerifierLogLevel::STATS;
