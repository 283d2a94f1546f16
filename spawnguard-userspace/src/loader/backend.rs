//! The backend: the one asked for, the best one this kernel supports, and the lsm probe that
//! tells whether BPF LSM programs run here.

use anyhow::{anyhow, bail, Context, Result};
use aya::{maps::Array, programs::ProgramError, BtfError, Ebpf, EbpfError, EbpfLoader};

pub use spawnguard_common::Backend;

use super::object::{ebpf_object, VERIFIER_LOG};
use crate::{btf::Btf, kfunc::patch_kfunc_calls};

pub const KILL_KFUNC: &str = "bpf_send_signal_task";

/// The backend asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    #[default]
    Auto,
    Lsm,
    Kill,
    KillCompat,
}

/// Whether a task refused after it exists is killed with the kfunc (else `sys_exit` kills it at
/// its next syscall exit, and is attached for that).
pub(super) fn stops_with_kfunc(backend: Backend, has_kill: bool) -> bool {
    match backend {
        Backend::Kill => true,
        Backend::Lsm => has_kill,
        Backend::KillCompat => false,
    }
}

impl BackendChoice {
    /// Picks the best backend this kernel supports (`lsm` where BPF LSM programs run, then
    /// `kill` where the kfunc exists, then `kill-compat`), or checks a forced one. `lsm` is
    /// the outcome of `probe_lsm`. Returns the backend and why, in one line.
    pub fn select(
        self,
        has_kill: bool,
        lsm: &std::result::Result<(), String>,
    ) -> Result<(Backend, String)> {
        let after_kill = if has_kill {
            "with the bpf_send_signal_task kfunc for migrations (no per-syscall cost)"
        } else {
            "with a syscall-exit hook for migrations (no bpf_send_signal_task kfunc, needs \
             >= 6.13)"
        };
        Ok(match (self, lsm) {
            (BackendChoice::Auto, Ok(())) => (
                Backend::Lsm,
                format!("BPF LSM programs run here: a denied fork fails with EAGAIN, {after_kill}"),
            ),
            (BackendChoice::Auto, Err(why)) if has_kill => (
                Backend::Kill,
                format!(
                    "no lsm backend ({why}); the kernel has the bpf_send_signal_task kfunc \
                     (no per-syscall cost)"
                ),
            ),
            (BackendChoice::Auto, Err(why)) => (
                Backend::KillCompat,
                format!(
                    "no lsm backend ({why}); the kernel lacks the bpf_send_signal_task kfunc \
                     (needs >= 6.13)"
                ),
            ),
            (BackendChoice::Lsm, Err(why)) => bail!(
                "--backend lsm needs BPF LSM programs, which this kernel does not run: {why} \
                 (`spawnguard doctor` says what to change; or use --backend auto)"
            ),
            (BackendChoice::Lsm, Ok(())) => {
                (Backend::Lsm, format!("forced with --backend, {after_kill}"))
            }
            (BackendChoice::Kill, _) if !has_kill => bail!(
                "--backend kill needs the bpf_send_signal_task kfunc (kernel >= 6.13), which \
                 this kernel lacks; use --backend kill-compat or auto"
            ),
            (BackendChoice::Kill, _) => (Backend::Kill, "forced with --backend".into()),
            (BackendChoice::KillCompat, _) => (Backend::KillCompat, "forced with --backend".into()),
        })
    }
}

/// Loads, attaches and at once detaches a BPF LSM program that allows everything: Ok when this
/// kernel can run BPF LSM programs (what the lsm backend needs), else why not.
pub fn probe_lsm(btf: &Btf) -> Result<()> {
    let kernel_btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let mut object = ebpf_object().to_vec();
    patch_kfunc_calls(&mut object, btf)?;
    let mut ebpf = EbpfLoader::new()
        .verifier_log_level(VERIFIER_LOG)
        .load(&object)
        .context("loading the eBPF object")?;
    run_lsm_probe(&mut ebpf, &kernel_btf)
}

/// The probe of `probe_lsm`, with the `lsm_probe` program of an object already loaded.
pub(super) fn run_lsm_probe(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<()> {
    let prog: &mut aya::programs::Lsm = ebpf
        .program_mut("lsm_probe")
        .ok_or_else(|| anyhow!("program lsm_probe missing from the eBPF object"))?
        .try_into()?;
    prog.load("task_alloc", kernel_btf)
        .context("loading an lsm/task_alloc program")?;
    let link = prog
        .attach()
        .context("attaching an lsm/task_alloc program")?;
    // A new thread passes task_alloc: the program must have run. (Where `bpf` is not an
    // active LSM, the program attaches but the kernel never calls it.)
    let _ = std::thread::spawn(|| {}).join();
    prog.detach(link)?;
    let runs: Array<_, u64> = Array::try_from(
        ebpf.map("LSM_PROBE_RUNS")
            .ok_or_else(|| anyhow!("map LSM_PROBE_RUNS missing from the eBPF object"))?,
    )?;
    if runs.get(&0, 0)? == 0 {
        bail!("an lsm/task_alloc program attaches but never runs: bpf is not an active LSM");
    }
    Ok(())
}

/// A probe's error as one line: the chain of causes as `{e:#}` shows it, up to a refused load,
/// whose verifier log aya appends to its message and which is left out.
pub(super) fn one_line(e: anyhow::Error) -> String {
    let mut causes = Vec::new();
    for cause in e.chain() {
        if let Some(refused) = refused_load(cause) {
            causes.push(refused);
            break;
        }
        causes.push(cause.to_string());
    }
    causes.join(": ")
}

/// aya's message for a refused load, without the verifier's log (`None`: not a refused load).
fn refused_load(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let program = |e: &ProgramError| match e {
        ProgramError::LoadError { io_error, .. } => {
            Some(format!("the BPF_PROG_LOAD syscall returned {io_error}"))
        }
        _ => None,
    };
    let btf = |e: &BtfError| match e {
        BtfError::LoadError { io_error, .. } => {
            Some(format!("the BPF_BTF_LOAD syscall returned {io_error}"))
        }
        _ => None,
    };
    if let Some(e) = e.downcast_ref::<ProgramError>() {
        return program(e);
    }
    if let Some(e) = e.downcast_ref::<BtfError>() {
        return btf(e);
    }
    match e.downcast_ref::<EbpfError>()? {
        EbpfError::ProgramError(e) => program(e).map(|m| format!("program error: {m}")),
        EbpfError::BtfError(e) => btf(e).map(|m| format!("BTF error: {m}")),
        _ => None,
    }
}

/// `probe_lsm` with its error as one line.
pub fn probe_lsm_reason(btf: &Btf) -> std::result::Result<(), String> {
    probe_lsm(btf).map_err(one_line)
}

#[cfg(test)]
mod tests {
    use aya_obj::VerifierLog;

    use super::*;

    #[test]
    fn a_refused_load_is_one_line_without_the_verifier_log() {
        let refused = || {
            anyhow::Error::new(ProgramError::LoadError {
                io_error: std::io::Error::from_raw_os_error(libc::EPERM),
                verifier_log: VerifierLog::new("0: R1=ctx() R10=fp0\nprocessed 2 insns".into()),
            })
            .context("loading an lsm/task_alloc program")
        };
        let line = "loading an lsm/task_alloc program: the BPF_PROG_LOAD syscall returned \
                    Operation not permitted (os error 1)";
        assert_eq!(one_line(refused()), line);
        // What the message's text gave before the errors were matched by their variant.
        let text = format!("{:#}", refused());
        assert_eq!(text.split(". Verifier output").next(), Some(line));
        let btf = anyhow::Error::new(EbpfError::BtfError(BtfError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EINVAL),
            verifier_log: VerifierLog::new("magic".into()),
        }))
        .context("loading the eBPF object");
        assert_eq!(
            one_line(btf),
            "loading the eBPF object: BTF error: the BPF_BTF_LOAD syscall returned Invalid \
             argument (os error 22)"
        );
        // Any other error is its whole chain.
        let other = anyhow!("an lsm/task_alloc program attaches but never runs")
            .context("reading the kernel's BTF");
        assert_eq!(
            one_line(other),
            "reading the kernel's BTF: an lsm/task_alloc program attaches but never runs"
        );
    }

    #[test]
    fn auto_prefers_lsm_then_kill_then_kill_compat() {
        let lsm_ok = Ok(());
        let no_lsm: std::result::Result<(), String> = Err("bpf is not an active LSM".into());
        let pick = |has_kill, lsm: &std::result::Result<(), String>| {
            BackendChoice::Auto.select(has_kill, lsm).unwrap()
        };
        assert_eq!(pick(true, &lsm_ok).0, Backend::Lsm);
        assert_eq!(pick(false, &lsm_ok).0, Backend::Lsm);
        let (b, why) = pick(true, &no_lsm);
        assert_eq!(b, Backend::Kill);
        assert!(why.contains("bpf is not an active LSM"), "{why}");
        let (b, why) = pick(false, &no_lsm);
        assert_eq!(b, Backend::KillCompat);
        assert!(
            why.contains("lacks the bpf_send_signal_task kfunc"),
            "{why}"
        );
        // lsm kills what task_alloc cannot refuse with the kfunc where there is one.
        assert!(stops_with_kfunc(Backend::Lsm, true));
        assert!(!stops_with_kfunc(Backend::Lsm, false));
        assert!(!stops_with_kfunc(Backend::KillCompat, true));
    }

    #[test]
    fn a_forced_backend_the_kernel_lacks_is_refused_with_the_reason() {
        let no_lsm: std::result::Result<(), String> = Err("EPERM loading it".into());
        let e = BackendChoice::Lsm.select(true, &no_lsm).unwrap_err();
        assert!(
            format!("{e}").starts_with("--backend lsm needs BPF LSM programs")
                && format!("{e}").contains("EPERM loading it"),
            "{e}"
        );
        let e = BackendChoice::Kill.select(false, &Ok(())).unwrap_err();
        assert!(format!("{e}").starts_with("--backend kill needs"), "{e}");
    }
}
