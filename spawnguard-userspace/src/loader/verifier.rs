//! What the kernel's verifier walked to accept each program of a backend (its "steps": the
//! instructions it processed). For one kernel, backend and build the count is exact, unlike a
//! timing: the CI guard compares it with a record (`tests/verifier-steps.toml`), and
//! `spawnguard doctor --verifier-steps` shows it with the share of the kernel's limit.
//!
//! From 5.16 the kernel reports it in `bpf_prog_info.verified_insns`. Before that only the
//! verifier's statistics log says it ("processed N insns"), and aya 0.14 keeps that log only
//! when a load fails; so on those kernels each program is loaded once with no file descriptor
//! left to give it: the kernel verifies it, writes the log, then fails with EMFILE.

use std::os::fd::AsRawFd;

use aya::programs::{BtfTracePoint, Lsm, ProgramError, RawTracePoint};
use serde::Serialize;

use super::{
    attach::{Kind, HOOKS},
    backend::stops_with_kfunc,
    emulated_atomics,
    install::load_object,
    object::ebpf_object,
    Backend, MapCapacity, KILL_KFUNC,
};
use crate::{btf::Btf, host, kfunc::patch_kfunc_calls};

/// The verifier's limit of instructions processed per program (`BPF_COMPLEXITY_LIMIT_INSNS`,
/// the same on every kernel spawnguard runs on).
pub const VERIFIER_LIMIT: u64 = 1_000_000;

/// The first kernel that reports `verified_insns` in `bpf_prog_info`.
pub const VERIFIED_INSNS_KERNEL: (u32, u32) = (5, 16);

/// Where the counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StepsFrom {
    /// `bpf_prog_info.verified_insns` (5.16 and later).
    ProgInfo,
    /// The "processed N insns" line of the verifier's statistics log (any kernel).
    Log,
}

impl StepsFrom {
    /// What this kernel offers: the program info where it has the count, else the log.
    pub fn for_this_kernel() -> Self {
        if host::kernel_older_than(&host::kernel_release(), VERIFIED_INSNS_KERNEL) {
            StepsFrom::Log
        } else {
            StepsFrom::ProgInfo
        }
    }
}

/// One program's count.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramSteps {
    pub program: String,
    pub steps: u64,
}

/// Every program a backend loads, with its verifier steps, in `HOOKS`' order.
#[derive(Clone, Debug, Serialize)]
pub struct VerifierSteps {
    /// `uname -r`.
    pub kernel: String,
    pub backend: String,
    /// Whether the object that emulates the atomic instructions was loaded (kernels before
    /// 5.12, or `SPAWNGUARD_EMULATED_ATOMICS=1`): its programs are other programs.
    pub emulated_atomics: bool,
    pub from: StepsFrom,
    pub limit: u64,
    pub programs: Vec<ProgramSteps>,
}

impl VerifierSteps {
    /// The record's key for this backend and object: `kill`, `kill+emulated-atomics`, ...
    pub fn key(&self) -> String {
        if self.emulated_atomics {
            format!("{}+emulated-atomics", self.backend)
        } else {
            self.backend.clone()
        }
    }

    /// Programs that took half the verifier's limit or more: the margin a kernel's verifier
    /// needs (6.1's nearly ran out twice).
    pub fn over_half_the_limit(&self) -> Vec<&ProgramSteps> {
        self.programs
            .iter()
            .filter(|p| p.steps * 2 >= self.limit)
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepsError {
    #[error("the {0} backend cannot load here: {1}")]
    Unsupported(Backend, &'static str),
    #[error("preparing the eBPF object: {0:#}")]
    Prepare(anyhow::Error),
    #[error("loading the {program} program")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the {program} program is missing from the eBPF object")]
    Missing { program: &'static str },
    #[error("the kernel did not report the verifier steps of {program} ({from:?})")]
    NotReported {
        program: &'static str,
        from: StepsFrom,
    },
    #[error("setting RLIMIT_NOFILE to read the verifier's log: {0}")]
    Rlimit(std::io::Error),
}

/// Loads (never attaches) every program `backend` attaches, as the daemon would load it, and
/// returns each one's verifier steps, read `from` the program info or the verifier's log.
/// Needs root; leaves nothing loaded. The lsm backend needs a kernel whose BPF trampolines
/// work (its programs fail to load otherwise: `Load`).
pub fn verifier_steps(backend: Backend, from: StepsFrom) -> Result<VerifierSteps, StepsError> {
    let btf = Btf::from_sys_fs().map_err(|e| StepsError::Prepare(e.into()))?;
    let offsets = btf
        .kernel_offsets()
        .map_err(|e| StepsError::Prepare(e.into()))?;
    let mut object = ebpf_object().to_vec();
    let kfuncs = patch_kfunc_calls(&mut object, &btf).map_err(|e| StepsError::Prepare(e.into()))?;
    let has_kill = kfuncs.has(KILL_KFUNC);
    if backend == Backend::Kill && !has_kill {
        return Err(StepsError::Unsupported(
            backend,
            "no bpf_send_signal_task kfunc (kernel >= 6.13)",
        ));
    }
    let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| StepsError::Prepare(e.into()))?;
    let mut ebpf = load_object(&object, &offsets, backend, has_kill, MapCapacity::default())
        .map_err(StepsError::Prepare)?;
    let kfunc = stops_with_kfunc(backend, has_kill);
    let mut programs = Vec::new();
    for h in HOOKS.iter().filter(|h| h.when.applies(backend, kfunc)) {
        let name = h.program;
        let program = ebpf
            .program_mut(name)
            .ok_or(StepsError::Missing { program: name })?;
        let mut load = || -> Result<(), ProgramError> {
            match (h.kind, h.target) {
                (Kind::BtfTracePoint, Some(target)) => {
                    let p: &mut BtfTracePoint = program.try_into()?;
                    p.load(target, &kernel_btf)
                }
                (Kind::Lsm, Some(target)) => {
                    let p: &mut Lsm = program.try_into()?;
                    p.load(target, &kernel_btf)
                }
                (Kind::RawTracePoint, _) => {
                    let p: &mut RawTracePoint = program.try_into()?;
                    p.load()
                }
                // `HOOKS`' own test checks that every such row has a target.
                (Kind::BtfTracePoint | Kind::Lsm, None) => Err(ProgramError::NotLoaded),
            }
        };
        let steps = match from {
            StepsFrom::ProgInfo => {
                load().map_err(|source| StepsError::Load {
                    program: name,
                    source,
                })?;
                let program = ebpf
                    .program(name)
                    .ok_or(StepsError::Missing { program: name })?;
                program
                    .info()
                    .ok()
                    .and_then(|i| i.verified_instruction_count())
                    .map(u64::from)
            }
            StepsFrom::Log => steps_from_log(load).map_err(|e| match e {
                LogError::Load(source) => StepsError::Load {
                    program: name,
                    source,
                },
                LogError::Rlimit(e) => StepsError::Rlimit(e),
            })?,
        }
        .ok_or(StepsError::NotReported {
            program: name,
            from,
        })?;
        programs.push(ProgramSteps {
            program: name.to_owned(),
            steps,
        });
    }
    Ok(VerifierSteps {
        kernel: host::kernel_release(),
        backend: backend.name().to_owned(),
        emulated_atomics: emulated_atomics(),
        from,
        limit: VERIFIER_LIMIT,
        programs,
    })
}

enum LogError {
    Load(ProgramError),
    Rlimit(std::io::Error),
}

/// Runs `load` with no file descriptor free for the program: the kernel verifies it, writes
/// its statistics into the log, and only then fails to give it an fd (EMFILE), which makes aya
/// return the log. `None` when the log has no count. Not for a process whose other threads
/// open files meanwhile (the CLI's is single-threaded here).
fn steps_from_log(
    load: impl FnOnce() -> Result<(), ProgramError>,
) -> Result<Option<u64>, LogError> {
    // The lowest free descriptor: the limit goes there, so no new one can be made.
    let lowest = std::fs::File::open("/dev/null")
        .map_err(LogError::Rlimit)?
        .as_raw_fd();
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) } != 0 {
        return Err(LogError::Rlimit(std::io::Error::last_os_error()));
    }
    let tight = libc::rlimit {
        rlim_cur: lowest as libc::rlim_t,
        rlim_max: old.rlim_max,
    };
    // SAFETY: setrlimit reads the struct; lowering the soft limit is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) } != 0 {
        return Err(LogError::Rlimit(std::io::Error::last_os_error()));
    }
    let result = load();
    // SAFETY: as above; the old soft limit is within the unchanged hard limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    match result {
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) if io_error.raw_os_error() == Some(libc::EMFILE) => {
            Ok(processed_insns(&verifier_log.to_string()))
        }
        Err(e) => Err(LogError::Load(e)),
        // A kernel that gave the program an fd anyway: no log to read.
        Ok(()) => Ok(None),
    }
}

/// The count in the verifier's statistics line: "processed 44787 insns (limit 1000000) ...".
fn processed_insns(log: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.trim()
            .strip_prefix("processed ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_read_from_the_statistics_line() {
        // 5.10's and 6.x's wording.
        let log = "func#0 @0\nprocessed 44787 insns (limit 1000000) max_states_per_insn 4 \
                   total_states 3000 peak_states 900 mark_read 20\n";
        assert_eq!(processed_insns(log), Some(44787));
        assert_eq!(processed_insns("verification time 12 usec\n"), None);
    }
}
