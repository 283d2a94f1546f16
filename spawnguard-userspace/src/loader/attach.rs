//! Loading the programs and attaching them, from one table (`HOOKS`), with their links pinned
//! so that they outlive the daemon.

use std::{path::Path, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{links::FdLink, BtfTracePoint, Lsm, ProgramInfo, RawTracePoint},
    Ebpf,
};

use super::Backend;

/// The program the daemon runs to settle empty instance entries (see `settle.rs`).
pub const SETTLE_PROGRAM: &str = "settle";

/// How a program is loaded and attached (its section in the object: `tp_btf/`, `lsm/`,
/// `raw_tp/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A BTF tracepoint, loaded against the kernel's BTF for its target.
    BtfTracePoint,
    /// A BPF LSM program, loaded against the kernel's BTF for its hook (the target).
    Lsm,
    /// A raw tracepoint, attached to its target by name.
    RawTracePoint,
}

/// When a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum When {
    /// With every backend.
    Always,
    /// With the lsm backend only.
    LsmBackend,
    /// Only where a refused task is not killed with the kfunc (`stops_with_kfunc`): `sys_exit`
    /// kills it at its next syscall exit instead.
    WithoutKfunc,
    /// Never here: `run_lsm_probe` loads, attaches and detaches it alone, before the backend is
    /// chosen.
    Probe,
}

impl When {
    /// Whether the program is attached for `backend`; `kfunc`: whether a refused task is killed
    /// with the kfunc.
    pub(super) fn applies(self, backend: Backend, kfunc: bool) -> bool {
        match self {
            When::Always => true,
            When::LsmBackend => backend == Backend::Lsm,
            When::WithoutKfunc => !kfunc,
            When::Probe => false,
        }
    }
}

/// One program of the eBPF object, and how and when it is attached.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hook {
    /// The program's name in the object; its link (or program) is pinned under this name.
    pub program: &'static str,
    pub kind: Kind,
    /// The tracepoint or LSM hook it runs at. `None`: loaded and its program pinned, never
    /// attached.
    pub target: Option<&'static str>,
    pub when: When,
}

const fn hook(program: &'static str, kind: Kind, target: &'static str, when: When) -> Hook {
    Hook {
        program,
        kind,
        target: Some(target),
        when,
    }
}

/// Every program of the eBPF object, in the order `attach_and_pin` loads, attaches and pins
/// them. The order matters, and is the one the kernel tests run:
///
/// - `sched_process_free` before `sched_process_exit`: release first, then exit, so an exit's
///   charge is never parked where nothing releases it.
/// - The other tracepoints after them, in the order they have always been attached (the
///   migration hook, `cgroup_attach_task`, last). All of them run before any agent is counted
///   (`reconcile` runs after the attach).
/// - The lsm programs after the tracepoints, and `task_free` before `task_alloc`: a fork
///   admitted by `task_alloc` must always be released if it fails.
/// - `sys_exit` (kills at its next syscall exit a task refused after it exists, where the kfunc
///   does not) after those.
/// - `settle` last: loaded, never attached; the daemon runs it on entries it found empty
///   (`settle.rs`).
/// - `lsm_probe` is never attached here: `run_lsm_probe` attaches it alone, and detaches it,
///   before the backend is chosen (and so before everything above).
pub(super) const HOOKS: [Hook; 12] = [
    // Release first, then exit: an exit's charge is never parked where nothing releases it.
    hook(
        "sched_process_free",
        Kind::BtfTracePoint,
        "sched_process_free",
        When::Always,
    ),
    hook(
        "sched_process_fork",
        Kind::BtfTracePoint,
        "sched_process_fork",
        When::Always,
    ),
    hook(
        "sched_process_exit",
        Kind::BtfTracePoint,
        "sched_process_exit",
        When::Always,
    ),
    hook(
        "task_newtask",
        Kind::BtfTracePoint,
        "task_newtask",
        When::Always,
    ),
    hook(
        "cgroup_mkdir",
        Kind::BtfTracePoint,
        "cgroup_mkdir",
        When::Always,
    ),
    hook(
        "cgroup_rmdir",
        Kind::BtfTracePoint,
        "cgroup_rmdir",
        When::Always,
    ),
    hook(
        "cgroup_attach_task",
        Kind::BtfTracePoint,
        "cgroup_attach_task",
        When::Always,
    ),
    // task_free first: a fork admitted by task_alloc must always be released if it fails.
    hook("task_free", Kind::Lsm, "task_free", When::LsmBackend),
    hook("task_alloc", Kind::Lsm, "task_alloc", When::LsmBackend),
    hook(
        "sys_exit",
        Kind::RawTracePoint,
        "sys_exit",
        When::WithoutKfunc,
    ),
    // Loaded, never attached: the daemon runs it on entries it found empty (`settle.rs`).
    Hook {
        program: SETTLE_PROGRAM,
        kind: Kind::RawTracePoint,
        target: None,
        when: When::Always,
    },
    hook("lsm_probe", Kind::Lsm, "task_alloc", When::Probe),
];

/// Loads every hook `HOOKS` attaches for `backend` (`kfunc`: whether a refused task is killed
/// with the kfunc), attaches it, and pins the link so the hook outlives this process.
pub(super) fn attach_and_pin(
    ebpf: &mut Ebpf,
    backend: Backend,
    kfunc: bool,
    dir: &Path,
    btf: &aya::Btf,
) -> Result<()> {
    let links = dir.join("links");
    std::fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
    // What the verifier cost, per program: most of a start's time on a slow machine.
    let started = Instant::now();
    let mut verified = Vec::new();
    let mut note = |hook: &str, t: Instant, info: Option<ProgramInfo>| {
        // The kernel reports the count from 5.16 on.
        let steps = info.and_then(|i| i.verified_instruction_count());
        tracing::debug!(
            "verified {hook} in {} ms ({})",
            t.elapsed().as_millis(),
            steps.map_or("steps not reported before 5.16".into(), |n| format!(
                "{n} instructions processed"
            ))
        );
        verified.push(steps);
    };
    for h in HOOKS.iter().filter(|h| h.when.applies(backend, kfunc)) {
        let hook = h.program;
        // How errors name it: lsm programs by their section.
        let shown = match h.kind {
            Kind::Lsm => format!("lsm/{hook}"),
            Kind::BtfTracePoint | Kind::RawTracePoint => hook.to_owned(),
        };
        let program = ebpf
            .program_mut(hook)
            .ok_or_else(|| anyhow!("program {hook} missing from the eBPF object"))?;
        // Every kind loads, is noted, and (with a target) attaches and pins its link the same
        // way; only the calls' arguments differ.
        macro_rules! load {
            ($prog:ident, $load:expr) => {{
                let t = Instant::now();
                $load.with_context(|| format!("loading the {shown} program"))?;
                note(hook, t, $prog.info().ok());
            }};
        }
        macro_rules! attach_and_pin_link {
            ($prog:ident, $attach:expr) => {{
                let id = $attach.with_context(|| format!("attaching the {shown} program"))?;
                FdLink::from($prog.take_link(id)?)
                    .pin(links.join(hook))
                    .with_context(|| format!("pinning the {shown} link"))?;
            }};
        }
        match (h.kind, h.target) {
            (Kind::BtfTracePoint, Some(target)) => {
                let prog: &mut BtfTracePoint = program.try_into()?;
                load!(prog, prog.load(target, btf));
                attach_and_pin_link!(prog, prog.attach());
            }
            (Kind::Lsm, Some(target)) => {
                let prog: &mut Lsm = program.try_into()?;
                load!(prog, prog.load(target, btf));
                attach_and_pin_link!(prog, prog.attach());
            }
            (Kind::RawTracePoint, Some(target)) => {
                let prog: &mut RawTracePoint = program.try_into()?;
                load!(prog, prog.load());
                attach_and_pin_link!(prog, prog.attach(target));
            }
            // Loaded, never attached: the daemon runs it on entries it found empty (`settle.rs`).
            (Kind::RawTracePoint, None) => {
                let prog: &mut RawTracePoint = program.try_into()?;
                load!(prog, prog.load());
                let programs = dir.join("programs");
                std::fs::create_dir_all(&programs)
                    .with_context(|| format!("creating {}", programs.display()))?;
                prog.pin(programs.join(hook))
                    .with_context(|| format!("pinning the {shown} program"))?;
            }
            (kind @ (Kind::BtfTracePoint | Kind::Lsm), None) => {
                bail!("the {shown} program ({kind:?}) has no attach target in HOOKS")
            }
        }
    }
    let steps: Option<u64> = verified.iter().map(|n| n.map(u64::from)).sum();
    tracing::info!(
        "loaded and attached {} programs in {:.2} s ({})",
        verified.len(),
        started.elapsed().as_secs_f64(),
        steps.map_or(
            "this kernel does not report verifier steps".into(),
            |n| format!("{n} instructions processed by the verifier")
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use ::object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

    use super::*;
    use crate::loader::{
        backend::stops_with_kfunc,
        object::{EBPF_OBJECT, EBPF_OBJECT_EMULATED_ATOMICS},
    };

    /// The programs of an eBPF object, as (name, section): its global functions outside `.text`
    /// (which holds the subprograms and the compiler's helpers).
    fn programs(bytes: &[u8]) -> Vec<(String, String)> {
        let file = ::object::File::parse(bytes).expect("the embedded object parses");
        file.symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_global())
            .filter_map(|s| {
                let section = file.section_by_index(s.section_index()?).ok()?;
                let section = section.name().ok()?;
                (section != ".text").then(|| (s.name().unwrap().to_owned(), section.to_owned()))
            })
            .collect()
    }

    #[test]
    fn the_table_has_every_program_once_and_each_backend_attaches_it_at_most_once() {
        for (flavour, bytes) in [
            ("atomics", EBPF_OBJECT),
            ("emulated atomics", EBPF_OBJECT_EMULATED_ATOMICS),
        ] {
            let programs = programs(bytes);
            assert_eq!(programs.len(), HOOKS.len(), "{flavour}: {programs:?}");
            for (name, section) in &programs {
                let rows: Vec<&Hook> = HOOKS.iter().filter(|h| h.program == name).collect();
                assert_eq!(rows.len(), 1, "{flavour}: {name} has {} rows", rows.len());
                let row = rows[0];
                let prefix = match row.kind {
                    Kind::BtfTracePoint => "tp_btf",
                    Kind::Lsm => "lsm",
                    Kind::RawTracePoint => "raw_tp",
                };
                match row.target {
                    Some(target) => assert_eq!(*section, format!("{prefix}/{target}"), "{name}"),
                    None => assert!(section.starts_with(&format!("{prefix}/")), "{name}"),
                }
            }
            for backend in [Backend::Lsm, Backend::Kill, Backend::KillCompat] {
                for has_kill in [true, false] {
                    let kfunc = stops_with_kfunc(backend, has_kill);
                    let attached: Vec<&str> = HOOKS
                        .iter()
                        .filter(|h| h.when.applies(backend, kfunc))
                        .map(|h| h.program)
                        .collect();
                    let mut once = attached.clone();
                    once.sort_unstable();
                    once.dedup();
                    assert_eq!(once.len(), attached.len(), "{backend}: {attached:?}");
                    for (name, _) in &programs {
                        let expected = match name.as_str() {
                            "task_alloc" | "task_free" => backend == Backend::Lsm,
                            "sys_exit" => !kfunc,
                            "lsm_probe" => false,
                            _ => true,
                        };
                        assert_eq!(
                            attached.contains(&name.as_str()),
                            expected,
                            "{backend}, kfunc {kfunc}: {name}"
                        );
                    }
                }
            }
        }
    }

    /// The order is the one the kernel tests run (see `HOOKS`): a change here needs them.
    #[test]
    fn the_table_keeps_the_attach_order() {
        let order: Vec<&str> = HOOKS.iter().map(|h| h.program).collect();
        assert_eq!(
            order,
            [
                "sched_process_free",
                "sched_process_fork",
                "sched_process_exit",
                "task_newtask",
                "cgroup_mkdir",
                "cgroup_rmdir",
                "cgroup_attach_task",
                "task_free",
                "task_alloc",
                "sys_exit",
                "settle",
                "lsm_probe",
            ]
        );
    }
}
