//! What the hooks left behind. An instance's last task gives its entry (and its
//! `max_instances` slot) back; where that cannot happen — the close missed the emulated-atomics
//! lock (kernels before 5.12: a lock holder's vCPU descheduled), the first task was refused, the
//! processes moved out — the entry stays. And an exited task's charge is given back when the
//! kernel frees the task; a few were seen never given back on a loaded host (the cause is not
//! found). A process record the free hook should have removed was seen too (after daemon kills
//! during an install): it holds no count, but an entry of the process map, and a full process
//! map refuses new processes in counted instances. Every `SWEEP` the daemon reads the instance
//! and release maps (the process map every `PROCESS_SWEEPS`); what it finds at two sweeps in a
//! row — an entry with no task and none waiting to be released, a charge whose task is gone
//! (reaped, or its pid taken by a later task), a record with no live task whose process is
//! gone — the kernel program `settle` gives back (run through
//! `BPF_PROG_TEST_RUN`, with the same compare-and-swap as the hooks, so a task entering
//! meanwhile wins, and removing the parked charge first, so it is never given back twice).
//! While the daemon is down these wait.

use std::{
    collections::HashSet,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::programs::{ProgramFd, RawTracePoint};
use spawnguard_common::{
    InstanceState, SETTLE_BUSY, SETTLE_DONE, SETTLE_INSTANCE, SETTLE_PROCESS, SETTLE_RELEASE,
};
use spawnguard_ebpf::{word_tasks, OPENING, RECLAIMING};

use crate::{condemned, loader, mapbatch, pinned};

/// How often the entries are read.
const SWEEP: Duration = Duration::from_secs(1);
/// The process map (up to 65,536 entries) is read every this many sweeps.
const PROCESS_SWEEPS: u64 = 5;

/// Every `SWEEP`: settles what was left behind at the previous sweep and still is.
pub async fn watch() -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP);
    let (mut empty_before, mut gone_before) = (HashSet::new(), HashSet::new());
    let mut dead_before = HashSet::new();
    let mut program: Option<SettleProgram> = None;
    for sweep in 0u64.. {
        tick.tick().await;
        let (empty, gone) = match (empty_entries(), gone_tasks()) {
            (Ok(e), Ok(g)) => (e, g),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("settle sweep: {e:#}");
                continue;
            }
        };
        let mut due: Vec<[u64; 3]> = empty
            .intersection(&empty_before)
            .map(|id| [SETTLE_INSTANCE, *id, 0])
            .chain(
                gone.intersection(&gone_before)
                    .map(|&(task, start_ns)| [SETTLE_RELEASE, task, start_ns]),
            )
            .collect();
        (empty_before, gone_before) = (empty, gone);
        if sweep % PROCESS_SWEEPS == 0 {
            match dead_processes() {
                Ok(dead) => {
                    due.extend(
                        dead.intersection(&dead_before)
                            .map(|&tgid| [SETTLE_PROCESS, u64::from(tgid), 0]),
                    );
                    dead_before = dead;
                }
                Err(e) => tracing::debug!("settle sweep of the process map: {e:#}"),
            }
        }
        if due.is_empty() {
            continue;
        }
        if program.is_none() {
            match SettleProgram::open() {
                Ok(p) => program = Some(p),
                Err(e) => {
                    tracing::warn!("cannot settle {} leftovers of the hooks: {e:#}", due.len());
                    continue;
                }
            }
        }
        let Some(p) = &program else { continue };
        let (mut entries, mut released, mut records, mut busy) = (0, 0, 0, 0);
        for args in due {
            let (what, key) = (args[0], args[1]);
            match p.run(args) {
                Ok(SETTLE_DONE) if what == SETTLE_RELEASE => released += 1,
                Ok(SETTLE_DONE) if what == SETTLE_PROCESS => records += 1,
                Ok(SETTLE_DONE) => entries += 1,
                Ok(SETTLE_BUSY) => busy += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("settling {key}: {e}");
                    program = None;
                    break;
                }
            }
        }
        if released > 0 {
            tracing::warn!(
                "gave back the charges of {released} exited tasks that were gone (reaped) but \
                 never released by the kernel's free hook"
            );
        }
        if records > 0 {
            tracing::warn!(
                "removed the records of {records} processes that were gone (no live task) but \
                 never removed by the kernel's free hook"
            );
        }
        if entries + busy > 0 {
            tracing::debug!("settled {entries} empty instance entries ({busy} busy, retried)");
        }
    }
    Ok(())
}

/// The tgids of the process records that count no live task and whose process is gone (no
/// such pid: a zombie keeps its pid, and its record until it is reaped).
fn dead_processes() -> anyhow::Result<HashSet<u32>> {
    if !crate::host::in_host_pid_namespace() {
        // The kernel records host pids: /proc here would name other tasks.
        return Ok(HashSet::new());
    }
    let records = pinned::processes()?;
    Ok(mapbatch::entries(&records)?
        .into_iter()
        .filter(|(tgid, r)| r.live == 0 && !std::path::Path::new(&format!("/proc/{tgid}")).exists())
        .map(|(tgid, _)| tgid)
        .collect())
}

/// The parked charges (task address, start time) whose task is gone: no such pid, or a pid that
/// a later task took. A zombie (exited, not reaped) is still there: its charge stays, as its PID
/// does.
fn gone_tasks() -> anyhow::Result<HashSet<(u64, u64)>> {
    if !crate::host::in_host_pid_namespace() {
        // The kernel records host pids: /proc here would name other tasks.
        return Ok(HashSet::new());
    }
    let parked = pinned::releasing()?;
    Ok(mapbatch::entries(&parked)?
        .into_iter()
        .filter(|(_, r)| r.pid != 0 && is_gone(condemned::start_ticks(r.pid), r.start_ns))
        .map(|(task, r)| (task, r.start_ns))
        .collect())
}

/// Whether a task that started at `start_ns` is gone, given what /proc says of its pid.
fn is_gone(proc_start_ticks: std::io::Result<Option<u64>>, start_ns: u64) -> bool {
    match proc_start_ticks {
        Ok(None) => true,
        Ok(Some(ticks)) => ticks != condemned::ns_to_ticks(start_ns),
        // Unreadable: not known to be gone.
        Err(_) => false,
    }
}

/// The ids of the entries that hold no task and wait for none.
fn empty_entries() -> anyhow::Result<HashSet<u64>> {
    let instances = pinned::instances()?;
    Ok(mapbatch::entries(&instances)?
        .into_iter()
        .filter(|(_, s)| is_empty(s))
        .map(|(id, _)| id)
        .collect())
}

fn is_empty(s: &InstanceState) -> bool {
    word_tasks(s.tasks) == 0 && s.tasks & (OPENING | RECLAIMING) == 0 && s.releasing == 0
}

/// The pinned `settle` program.
struct SettleProgram {
    fd: ProgramFd,
}

/// `union bpf_attr`'s `test` member, up to `cpu` (Linux 5.10).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

impl SettleProgram {
    fn open() -> anyhow::Result<Self> {
        let path = loader::pin_dir()
            .join("programs")
            .join(loader::SETTLE_PROGRAM);
        // From the pin itself (bpf_obj_get): a program id would need CAP_SYS_ADMIN to open.
        let fd = RawTracePoint::from_pin(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Ok(Self { fd })
    }

    /// Runs the program on its arguments (what: `SETTLE_*`, key, start time); returns its
    /// `SETTLE_*` code.
    fn run(&self, args: [u64; 3]) -> std::io::Result<u32> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_fd().as_raw_fd() as u32,
            ctx_size_in: std::mem::size_of_val(&args) as u32,
            ctx_in: args.as_ptr() as u64,
            ..TestRunAttr::default()
        };
        // SAFETY: bpf(BPF_PROG_TEST_RUN) reads `attr` (its size given) and `args` (ctx_in,
        // ctx_size_in), both live for the call, and writes `retval` into `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(attr.retval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_without_tasks_or_pending_releases_are_empty() {
        let with = |tasks, releasing| InstanceState {
            tasks,
            releasing,
            ..InstanceState::default()
        };
        assert!(is_empty(&with(0, 0)));
        assert!(is_empty(&with(spawnguard_ebpf::ADMITTED, 0)));
        assert!(!is_empty(&with(spawnguard_ebpf::ADMITTED | 1, 0)));
        assert!(!is_empty(&with(spawnguard_ebpf::ADMITTED, 1)));
        assert!(!is_empty(&with(RECLAIMING, 0)));
        assert!(!is_empty(&with(OPENING, 0)), "a task is admitting it");
    }

    #[test]
    fn a_task_is_gone_when_its_pid_is_or_names_a_later_task() {
        let ns = 5_000_000_000;
        let ticks = condemned::ns_to_ticks(ns);
        assert!(is_gone(Ok(None), ns), "no such pid");
        assert!(
            is_gone(Ok(Some(ticks + 1)), ns),
            "a later task with its pid"
        );
        assert!(!is_gone(Ok(Some(ticks)), ns), "still there (a zombie, say)");
        assert!(!is_gone(Err(std::io::Error::other("unreadable")), ns));
    }

    #[test]
    fn the_test_run_attr_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<TestRunAttr>(), 72);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, cpu), 68);
    }
}
