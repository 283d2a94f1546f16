//! Empty instance entries the hooks could not give back. An instance's last task gives its
//! entry (and its `max_instances` slot) back; where that cannot happen — the close missed the
//! emulated-atomics lock (kernels before 5.12: a lock holder's vCPU descheduled), the first task
//! was refused, the processes moved out — the entry stays. Every `SWEEP`, an entry with no task
//! and none waiting to be released, found so at two sweeps in a row, is settled by the kernel
//! program `settle` (run through `BPF_PROG_TEST_RUN`, with the same compare-and-swap as the
//! hooks, so a task entering meanwhile wins). While the daemon is down such entries wait.

use std::{
    collections::HashSet,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData},
    programs::{ProgramFd, ProgramInfo},
};
use spawnguard_common::{maps, InstanceState, SETTLE_BUSY, SETTLE_DONE};
use spawnguard_ebpf::{word_tasks, OPENING, RECLAIMING};

use crate::{loader, mapbatch};

/// How often the entries are read.
const SWEEP: Duration = Duration::from_secs(1);

/// Every `SWEEP`: settles the entries that were empty at the previous sweep and still are.
pub async fn watch() -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP);
    let mut empty_before: HashSet<u64> = HashSet::new();
    let mut program: Option<SettleProgram> = None;
    loop {
        tick.tick().await;
        let empty = match empty_entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!("settle sweep: {e:#}");
                continue;
            }
        };
        let due: Vec<u64> = empty.intersection(&empty_before).copied().collect();
        empty_before = empty;
        if due.is_empty() {
            continue;
        }
        if program.is_none() {
            match SettleProgram::open() {
                Ok(p) => program = Some(p),
                Err(e) => {
                    tracing::warn!("cannot settle {} empty instance entries: {e:#}", due.len());
                    continue;
                }
            }
        }
        let Some(p) = &program else { continue };
        let (mut settled, mut busy) = (0, 0);
        for id in due {
            match p.run(id) {
                Ok(SETTLE_DONE) => settled += 1,
                Ok(SETTLE_BUSY) => busy += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("settling instance {id}: {e}");
                    program = None;
                    break;
                }
            }
        }
        if settled + busy > 0 {
            tracing::debug!("settled {settled} empty instance entries ({busy} busy, retried)");
        }
    }
}

/// The ids of the entries that hold no task and wait for none.
fn empty_entries() -> anyhow::Result<HashSet<u64>> {
    let instances: HashMap<MapData, u64, InstanceState> =
        HashMap::try_from(loader::open_installed(maps::INSTANCES)?)?;
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
        let fd = ProgramInfo::from_pin(&path)
            .and_then(|info| info.fd())
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Ok(Self { fd })
    }

    /// Runs the program on instance `id`; returns its `SETTLE_*` code.
    fn run(&self, id: u64) -> std::io::Result<u32> {
        let args = [id];
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
    fn the_test_run_attr_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<TestRunAttr>(), 72);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, cpu), 68);
    }
}
