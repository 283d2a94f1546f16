//! Loading the embedded eBPF object into the running kernel: offsets from BTF, kfunc ids, backend
//! choice, policy into maps, attaching every hook, pinning the maps for `status`.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{BtfTracePoint, RawTracePoint},
    Ebpf, EbpfLoader,
};
use serde::{Deserialize, Serialize};
use spawnguard_common::{
    maps, HostLimits, TypeDir, TypeLevels, TypeLimits, BACKEND_KILL, BACKEND_KILL_COMPAT,
    MAX_TYPES, MAX_TYPE_LEVELS, MODE_AUDIT, MODE_ENFORCE, NO_LIMIT, TYPE_NAME_LEN,
};
use spawnguard_ebpf::{rate_interval_ns, rate_window_ns};

use crate::{
    btf::Btf,
    cgroupfs::{self, Cgroup2},
    kfunc::{patch_kfunc_calls, KfuncPatch},
    policy::{Mode, Policy},
};

/// The eBPF object, built by build.rs and embedded: one file to install.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spawnguard.bpf.o"));

pub const PIN_DIR: &str = "/sys/fs/bpf/spawnguard";
pub const RUN_DIR: &str = "/run/spawnguard";
pub const STATE_FILE: &str = "/run/spawnguard/state.json";

const KILL_KFUNC: &str = "bpf_send_signal_task";

/// The backend asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    #[default]
    Auto,
    Kill,
    KillCompat,
}

/// How a denied task is stopped. `lsm` (fork fails with EAGAIN) will be the third.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Kill,
    KillCompat,
}

impl Backend {
    fn code(self) -> u32 {
        match self {
            Backend::Kill => BACKEND_KILL,
            Backend::KillCompat => BACKEND_KILL_COMPAT,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Kill => "kill",
            Backend::KillCompat => "kill-compat",
        }
    }

    /// Picks the best backend this kernel supports, or checks a forced one.
    pub fn select(choice: BackendChoice, kfuncs: &KfuncPatch) -> Result<(Self, &'static str)> {
        let has_kill = kfuncs.has(KILL_KFUNC);
        match choice {
            BackendChoice::Auto if has_kill => Ok((
                Backend::Kill,
                "the kernel has the bpf_send_signal_task kfunc (no per-syscall cost)",
            )),
            BackendChoice::Auto => Ok((
                Backend::KillCompat,
                "the kernel lacks the bpf_send_signal_task kfunc (needs >= 6.13)",
            )),
            BackendChoice::Kill if !has_kill => bail!(
                "--backend kill needs the bpf_send_signal_task kfunc (kernel >= 6.13), which \
                 this kernel lacks; use --backend kill-compat or auto"
            ),
            BackendChoice::Kill => Ok((Backend::Kill, "forced with --backend")),
            BackendChoice::KillCompat => Ok((Backend::KillCompat, "forced with --backend")),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One type of the policy, placed on this host's cgroup2 hierarchy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlacedType {
    pub name: String,
    pub index: u32,
    /// Absolute path of the type directory.
    pub dir: PathBuf,
    pub cgroup_id: u64,
    pub level: u32,
    pub mode: String,
    pub max_tasks: u64,
    pub max_threads: u64,
}

/// What the daemon writes to `STATE_FILE` for the CLI (`status`, `exec`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub backend: Backend,
    pub cgroup2: PathBuf,
    pub types: Vec<PlacedType>,
}

impl DaemonState {
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string(STATE_FILE).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Puts the policy's types on the hierarchy: creates missing type directories and reads their ids.
pub fn place_types(policy: &Policy, cg: &Cgroup2) -> Result<Vec<PlacedType>> {
    policy
        .types
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let dir = cg.dir(&t.path);
            cgroupfs::ensure_dir(&dir)
                .with_context(|| format!("creating the directory of type \"{}\"", t.name))?;
            Ok(PlacedType {
                name: t.name.clone(),
                index: index as u32,
                cgroup_id: cgroupfs::cgroup_id(&dir)?,
                level: cg.level(&t.path),
                dir,
                mode: t.mode.to_string(),
                max_tasks: t.max_tasks,
                max_threads: t.max_threads,
            })
        })
        .collect()
}

/// Usage at which `warn_at` of `limit` is reached (at least 1).
fn warn_threshold(limit: u64, warn_at: f64) -> u64 {
    if limit == NO_LIMIT {
        NO_LIMIT
    } else {
        ((limit as f64 * warn_at).ceil() as u64).max(1)
    }
}

fn type_limits(policy: &Policy, index: usize) -> TypeLimits {
    let t = &policy.types[index];
    let warn_at = policy.host.warn_at;
    let mut name = [0u8; TYPE_NAME_LEN];
    name[..t.name.len()].copy_from_slice(t.name.as_bytes());
    let (interval, burst) = match t.fork_rate {
        Some(r) => (
            rate_interval_ns((r.per_sec * 1000.0).round().max(1.0) as u64),
            r.burst,
        ),
        None => (0, 0),
    };
    let max_instances = t.max_instances.unwrap_or(NO_LIMIT);
    let max_total_tasks = t.max_total_tasks.unwrap_or(NO_LIMIT);
    TypeLimits {
        max_tasks: t.max_tasks,
        max_threads: t.max_threads,
        rate_interval_ns: interval,
        rate_burst: burst,
        rate_window_ns: rate_window_ns(interval, burst),
        max_instances,
        max_total_tasks,
        warn_tasks: warn_threshold(t.max_tasks, warn_at),
        warn_total_tasks: warn_threshold(max_total_tasks, warn_at),
        warn_instances: warn_threshold(max_instances, warn_at),
        mode: match t.effective_mode() {
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        active: 1,
        name,
    }
}

fn host_limits(policy: &Policy) -> HostLimits {
    match policy.host.max_tasks {
        None => HostLimits::default(),
        Some(max) => HostLimits {
            max_tasks: max,
            deny_tasks: (max as f64 * policy.host.deny_at).floor() as u64,
            warn_tasks: warn_threshold(max, policy.host.warn_at),
        },
    }
}

/// The programs in the kernel, with their maps. Dropping it detaches everything.
pub struct Enforcer {
    ebpf: Ebpf,
    pub backend: Backend,
    pub backend_reason: &'static str,
    pub kfuncs: KfuncPatch,
    pinned: Option<PathBuf>,
}

/// Fails with one sentence when spawnguard cannot run here at all.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("spawnguard must run as root: it loads eBPF programs and manages cgroups (try sudo)");
    }
    if !Path::new(crate::btf::VMLINUX).exists() {
        bail!(
            "{} is missing: spawnguard needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            crate::btf::VMLINUX
        );
    }
    Ok(())
}

impl Enforcer {
    /// Loads, configures and attaches everything. Nothing is left in the kernel on error.
    pub fn load(choice: BackendChoice, policy: &Policy, types: &[PlacedType]) -> Result<Self> {
        let btf = Btf::from_sys_fs()?;
        let offsets = btf
            .kernel_offsets()
            .context("reading struct offsets from the kernel's BTF")?;
        let mut object = EBPF_OBJECT.to_vec();
        let kfuncs = patch_kfunc_calls(&mut object, &btf)?;
        let (backend, backend_reason) = Backend::select(choice, &kfuncs)?;
        let backend_code = backend.code();
        let ebpf = EbpfLoader::new()
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .override_global("BACKEND", &backend_code, true)
            .load(&object)
            .context("loading the eBPF object")?;
        let mut enforcer = Self {
            ebpf,
            backend,
            backend_reason,
            kfuncs,
            pinned: None,
        };
        enforcer.apply_policy(policy, types)?;
        enforcer.attach()?;
        Ok(enforcer)
    }

    /// Writes the policy into the maps the programs read.
    fn apply_policy(&mut self, policy: &Policy, types: &[PlacedType]) -> Result<()> {
        if types.len() > MAX_TYPES as usize {
            bail!("at most {MAX_TYPES} types are supported");
        }
        let mut levels: Vec<u32> = Vec::new();
        for t in types {
            if !levels.contains(&t.level) {
                levels.push(t.level);
            }
        }
        if levels.len() > MAX_TYPE_LEVELS {
            bail!(
                "type directories sit at {} different depths of the cgroup tree; at most \
                 {MAX_TYPE_LEVELS} are supported (put types side by side)",
                levels.len()
            );
        }
        {
            let mut limits: Array<_, TypeLimits> =
                Array::try_from(self.map_mut(maps::TYPE_POLICY)?)?;
            for index in 0..MAX_TYPES {
                let l = if (index as usize) < types.len() {
                    type_limits(policy, index as usize)
                } else {
                    TypeLimits::default()
                };
                limits.set(index, l, 0)?;
            }
        }
        {
            let mut host: Array<_, HostLimits> = Array::try_from(self.map_mut(maps::HOST_LIMITS)?)?;
            host.set(0, host_limits(policy), 0)?;
        }
        {
            let mut dirs: HashMap<_, u64, TypeDir> =
                HashMap::try_from(self.map_mut(maps::TYPE_DIRS)?)?;
            for t in types {
                let dir = TypeDir {
                    type_idx: t.index,
                    level: t.level,
                };
                dirs.insert(t.cgroup_id, dir, 0)?;
            }
        }
        let mut type_levels = TypeLevels {
            count: levels.len() as u32,
            ..TypeLevels::default()
        };
        type_levels.levels[..levels.len()].copy_from_slice(&levels);
        let mut level_map: Array<_, TypeLevels> =
            Array::try_from(self.map_mut(maps::TYPE_LEVELS)?)?;
        level_map.set(0, type_levels, 0)?;
        Ok(())
    }

    fn attach(&mut self) -> Result<()> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        for hook in [
            "sched_process_fork",
            "sched_process_exit",
            "cgroup_mkdir",
            "cgroup_rmdir",
            "cgroup_attach_task",
        ] {
            let prog: &mut BtfTracePoint = self
                .ebpf
                .program_mut(hook)
                .ok_or_else(|| anyhow!("program {hook} missing from the eBPF object"))?
                .try_into()?;
            prog.load(hook, &btf)
                .with_context(|| format!("loading the {hook} program"))?;
            prog.attach()
                .with_context(|| format!("attaching the {hook} program"))?;
        }
        if self.backend == Backend::KillCompat {
            let prog: &mut RawTracePoint = self
                .ebpf
                .program_mut("sys_exit")
                .ok_or_else(|| anyhow!("program sys_exit missing from the eBPF object"))?
                .try_into()?;
            prog.load().context("loading the sys_exit program")?;
            prog.attach("sys_exit")
                .context("attaching the sys_exit program")?;
        }
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    /// Pins every map under `dir` so `spawnguard status` can read them without the daemon.
    /// Stale pins from a daemon that died are replaced.
    pub fn pin_maps(&mut self, dir: &Path) -> Result<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing stale pins in {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        self.pinned = Some(dir.to_path_buf());
        for name in maps::ALL {
            self.map_mut(name)?
                .pin(dir.join(name))
                .with_context(|| format!("pinning map {name}"))?;
        }
        Ok(())
    }

    /// The event ring buffer, handed to the task that reads it.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or_else(|| anyhow!("map EVENTS missing"))?;
        Ok(RingBuf::try_from(map)?)
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        if let Some(dir) = &self.pinned {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
