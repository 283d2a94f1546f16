//! Loading the embedded eBPF object into the running kernel: offsets from BTF, kfunc ids, backend
//! choice, policy into maps, attaching every hook, pinning the maps for `status`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, Lsm, ProgramInfo, RawTracePoint,
    },
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use serde::{Deserialize, Serialize};
use spawnguard_common::{
    maps, BreakerLimits, BreakerState, HostLimits, InstanceState, Meta, PathKey, PathNode,
    TypeCounters, TypeDir, TypeLevels, TypeLimits, TypeState, LAYOUT_VERSION, MAX_PATH_NODES,
    MAX_TYPES, MAX_TYPE_LEVELS, MODE_AUDIT, MODE_ENFORCE, NO_LIMIT, NO_TYPE, ON_MAX_AGE_EVENT,
    ON_MAX_AGE_FREEZE, ON_MAX_AGE_KILL, PATH_NAME_LEN, TYPE_NAME_LEN,
};
use spawnguard_ebpf::{policy_index, rate_interval_ns, rate_window_ns};

pub use spawnguard_common::Backend;

use crate::{
    btf::Btf,
    cgroupfs::{self, Cgroup2},
    host,
    kfunc::patch_kfunc_calls,
    policy::{Mode, OnMaxAge, Policy},
};

/// The eBPF object, built by build.rs and embedded: one file to install.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spawnguard.bpf.o"));
/// The same programs for kernels without the atomic fetch and compare-and-swap instructions:
/// they emulate them (spawnguard-ebpf's `emulated-atomics` feature).
static EBPF_OBJECT_EMULATED_ATOMICS: &[u8] = aya::include_bytes_aligned!(concat!(
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
fn ebpf_object() -> &'static [u8] {
    if emulated_atomics() {
        EBPF_OBJECT_EMULATED_ATOMICS
    } else {
        EBPF_OBJECT
    }
}

pub const PIN_ROOT: &str = "/sys/fs/bpf/spawnguard";
pub const RUN_DIR: &str = "/run/spawnguard";
pub const STATE_FILE: &str = "/run/spawnguard/state.json";

pub const KILL_KFUNC: &str = "bpf_send_signal_task";

/// What the kernel says when it refuses a program: its verdict and statistics, not the trace
/// of every instruction (aya's default). The trace of a 50,000-step program overflows the log
/// buffer, and the kernel then keeps only its start, so the reason was lost.
const VERIFIER_LOG: VerifierLogLevel = VerifierLogLevel::STATS;

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
fn stops_with_kfunc(backend: Backend, has_kill: bool) -> bool {
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

/// One type of the policy, placed on this host's cgroup2 hierarchy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlacedType {
    pub name: String,
    pub index: u32,
    /// Absolute path of the type directory.
    pub dir: PathBuf,
    pub cgroup_id: u64,
    pub level: u32,
    pub mode: Mode,
    pub max_tasks: u64,
    pub max_threads: u64,
    pub max_age: Option<std::time::Duration>,
    pub on_max_age: OnMaxAge,
    /// The `pids.max` the backstop writes in its instances (`max_tasks` where enforced; none
    /// in audit or for an exempt type, which are never denied).
    #[serde(default)]
    pub backstop: Option<u64>,
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
                mode: t.mode,
                max_tasks: t.max_tasks,
                max_threads: t.max_threads,
                max_age: t.max_age,
                on_max_age: t.on_max_age,
                backstop: (t.effective_mode() == Mode::Enforce).then_some(t.max_tasks),
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
        max_age_ns: t
            .max_age
            .map_or(NO_LIMIT, |d| d.as_nanos().min(u128::from(NO_LIMIT)) as u64),
        on_max_age: match t.on_max_age {
            OnMaxAge::Event => ON_MAX_AGE_EVENT,
            OnMaxAge::Freeze => ON_MAX_AGE_FREEZE,
            OnMaxAge::Kill => ON_MAX_AGE_KILL,
        },
        rate_gen: 0,
        mode: match t.effective_mode() {
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        active: 1,
        name,
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX >> 8)) as u64
}

/// The kernel form of a type's breaker (disabled when the type has none).
pub fn breaker_limits(policy: &Policy, index: usize) -> BreakerLimits {
    let Some(b) = &policy.types[index].breaker else {
        return BreakerLimits::default();
    };
    let mut open_for_ms = [0; spawnguard_common::BREAKER_STEPS];
    for (slot, d) in open_for_ms.iter_mut().zip(&b.open_for) {
        *slot = ms(*d);
    }
    BreakerLimits {
        enabled: 1,
        _pad: 0,
        startup_window_ms: ms(b.startup_window),
        failures: b.failures,
        within_ms: ms(b.within),
        open_for_ms,
        steps: b.open_for.len() as u64,
        storm_denials: b.storm_denials.unwrap_or(0),
        storm_within_ms: b.storm_within.map_or(0, ms),
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

/// Where the pinned enforcer lives: `PIN_ROOT/v<LAYOUT_VERSION>/{links,maps}`.
pub fn pin_dir() -> PathBuf {
    Path::new(PIN_ROOT).join(format!("v{LAYOUT_VERSION}"))
}

/// Opens a pinned map by name.
pub fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// The side of the double-buffered policy maps in force in the enforcer pinned at `dir`.
pub fn policy_side(dir: &Path) -> Result<u32> {
    let side: Array<_, u32> = Array::try_from(open_pinned(dir, maps::POLICY_SIDE)?)?;
    Ok(side.get(&0, 0)? & 1)
}

/// The side in force of the installed enforcer's policy maps.
pub fn installed_policy_side() -> Result<u32> {
    policy_side(&pin_dir())
}

/// Puts the side just written in force (one 4-byte write the kernel sees at once), then waits
/// until no program can still be reading the other side, so that the next policy may be
/// written there: the programs run under RCU, and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits
/// for an RCU grace period.
fn switch_policy_side(dir: &Path, next: u32) -> Result<()> {
    let mut side: Array<_, u32> = Array::try_from(open_pinned(dir, maps::POLICY_SIDE)?)?;
    side.set(0, next, 0)?;
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier(cmd, flags, cpu_id) takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // nohz_full hosts refuse it: a program runs for microseconds, so a pause far longer
        // than that stands in for the grace period.
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Opens a map of the installed enforcer, or says that none is installed.
pub fn open_installed(name: &str) -> Result<Map> {
    let dir = pin_dir();
    if !dir.exists() {
        bail!(
            "no spawnguard enforcer is installed ({} is missing): start one with `spawnguard run`",
            dir.display()
        );
    }
    open_pinned(&dir, name)
}

/// The pinned enforcers of other map layouts (`v<N>` directory names under `PIN_ROOT`).
pub fn other_layouts() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| *name != format!("v{LAYOUT_VERSION}"))
        .collect()
}

/// Fails when pinned state of another layout version exists: adopting it would corrupt it.
fn check_no_other_layout() -> Result<()> {
    if let Some(name) = other_layouts().first() {
        bail!(
            "{PIN_ROOT}/{name} holds an enforcer with another map layout (this daemon uses \
             v{LAYOUT_VERSION}); it keeps enforcing its last policy. To migrate: stop its \
             daemon, run `spawnguard uninstall` (removes every pinned layout), then start this \
             daemon, which counts the running agents again"
        );
    }
    Ok(())
}

/// The enforcer in the kernel: programs attached through links pinned under `pin_dir()`, so
/// they keep enforcing when the daemon stops or dies, and their maps pinned beside them. The
/// daemon only ever works through the pins.
pub struct Enforcer {
    pub dir: PathBuf,
    pub backend: Backend,
    /// Why this backend (for the log).
    pub backend_reason: String,
    /// Whether this daemon found the enforcer already pinned and adopted it.
    pub adopted: bool,
    /// Processes counted at install by `reconcile`.
    pub reconciled: usize,
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
fn run_lsm_probe(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<()> {
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

/// A probe's error as one line (aya appends the verifier's log to a refused load).
fn one_line(e: anyhow::Error) -> String {
    format!("{e:#}")
        .split(". Verifier output")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `probe_lsm` with its error as one line.
pub fn probe_lsm_reason(btf: &Btf) -> std::result::Result<(), String> {
    probe_lsm(btf).map_err(one_line)
}

/// Fails with one sentence when spawnguard cannot run here at all.
pub fn preflight() -> Result<()> {
    if !host::is_root() {
        bail!("spawnguard must run as root: it loads eBPF programs and manages cgroups (try sudo)");
    }
    let release = host::kernel_release();
    let (major, minor) = host::MIN_KERNEL;
    if host::kernel_older_than(&release, host::MIN_KERNEL) {
        bail!(
            "spawnguard needs Linux {major}.{minor} or newer (BTF tracepoints, BPF LSM, ring \
             buffers); this kernel is {release} \
             (`spawnguard doctor` checks a host)"
        );
    }
    if !Path::new(crate::btf::VMLINUX).exists() {
        bail!(
            "{} is missing: spawnguard needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            crate::btf::VMLINUX
        );
    }
    Ok(())
}

/// Sizes of the maps an operator may choose (`spawnguard run --instance-capacity`).
#[derive(Clone, Copy, Debug)]
pub struct MapCapacity {
    /// Instances holding tasks at once.
    pub instances: u32,
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self {
            instances: spawnguard_common::MAX_INSTANCES,
        }
    }
}

impl MapCapacity {
    /// Instance directories whose creation time is kept: empty ones (cheap: 16 bytes each)
    /// included, so four per instance slot.
    pub fn created(&self) -> u32 {
        self.instances
            .saturating_mul(4)
            .max(spawnguard_common::MAX_CREATED)
    }
}

/// The program the daemon runs to settle empty instance entries (see `settle.rs`).
pub const SETTLE_PROGRAM: &str = "settle";

const HOOKS: [&str; 7] = [
    // Release first, then exit: an exit's charge is never parked where nothing releases it.
    "sched_process_free",
    "sched_process_fork",
    "sched_process_exit",
    "task_newtask",
    "cgroup_mkdir",
    "cgroup_rmdir",
    "cgroup_attach_task",
];

impl Enforcer {
    /// Adopts the pinned enforcer, or installs one; then puts `policy` in force.
    /// `capacity`: how many instances may hold tasks at once (the size of the instance map,
    /// fixed when the enforcer is installed).
    pub fn start(
        choice: BackendChoice,
        capacity: MapCapacity,
        policy: &Policy,
        types: &mut [PlacedType],
    ) -> Result<Self> {
        check_no_other_layout()?;
        let dir = pin_dir();
        if dir.join("links").exists() {
            let enforcer = Self::adopt(dir, choice)?;
            let pinned =
                aya::maps::MapInfo::from_pin(enforcer.dir.join("maps").join(maps::INSTANCES))
                    .map(|i| i.max_entries())
                    .ok();
            if pinned.is_some_and(|p| p != capacity.instances) {
                tracing::warn!(
                    "the pinned enforcer holds {} instances, not the {} asked for: a map's size \
                     is fixed when it is installed (`spawnguard uninstall`, then `run`, to change \
                     it; counts start again from the running processes)",
                    pinned.unwrap_or_default(),
                    capacity.instances
                );
            }
            let reconciled = enforcer.put_in_force(policy, types)?;
            return Ok(Self {
                reconciled,
                ..enforcer
            });
        }
        let result = Self::install(dir.clone(), choice, capacity, policy, types);
        if result.is_err() {
            // Nothing half-installed stays behind.
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    fn adopt(dir: PathBuf, choice: BackendChoice) -> Result<Self> {
        let meta: Array<_, Meta> = Array::try_from(open_pinned(&dir, maps::META)?)?;
        let meta = meta.get(&0, 0)?;
        if meta.layout_version != LAYOUT_VERSION {
            bail!(
                "{} holds map layout {} but claims v{LAYOUT_VERSION}; run `spawnguard uninstall`",
                dir.display(),
                meta.layout_version
            );
        }
        // A code no daemon wrote reads as the backend that needs least of the kernel.
        let backend = Backend::from_u32(meta.backend).unwrap_or(Backend::KillCompat);
        let forced = match choice {
            BackendChoice::Auto => None,
            BackendChoice::Lsm => Some(Backend::Lsm),
            BackendChoice::Kill => Some(Backend::Kill),
            BackendChoice::KillCompat => Some(Backend::KillCompat),
        };
        if forced.is_some_and(|f| f != backend) {
            bail!(
                "the pinned enforcer uses the {backend} backend; to change backend run \
                 `spawnguard uninstall` first"
            );
        }
        Ok(Self {
            dir,
            backend,
            backend_reason: "adopted from the pinned enforcer".into(),
            adopted: true,
            reconciled: 0,
        })
    }

    fn install(
        dir: PathBuf,
        choice: BackendChoice,
        capacity: MapCapacity,
        policy: &Policy,
        types: &mut [PlacedType],
    ) -> Result<Self> {
        // The kernel's BTF is parsed once here, once by aya for program loads, and once by
        // each `EbpfLoader` (its constructor always does): a parse of a 5 MB vmlinux BTF takes
        // a quarter second on a fast host and seconds in an emulated guest.
        if emulated_atomics() {
            tracing::info!(
                "loading the programs that emulate BPF atomic fetch and compare-and-swap (a lock \
                 in a map): kernels before {}.{} lack them (or {EMULATED_ATOMICS_ENV}=1)",
                host::ATOMICS_KERNEL.0,
                host::ATOMICS_KERNEL.1
            );
        }
        let btf = Btf::from_sys_fs()?;
        let offsets = btf
            .kernel_offsets()
            .context("reading struct offsets from the kernel's BTF")?;
        let mut object = ebpf_object().to_vec();
        let kfuncs = patch_kfunc_calls(&mut object, &btf)?;
        let has_kill = kfuncs.has(KILL_KFUNC);
        let kernel_btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let load = |backend: Backend| -> Result<Ebpf> {
            let code = backend as u32;
            let stop_with_kfunc = u32::from(stops_with_kfunc(backend, has_kill));
            EbpfLoader::new()
                .verifier_log_level(VERIFIER_LOG)
                .map_max_entries(maps::INSTANCES, capacity.instances)
                .map_max_entries(maps::CREATED, capacity.created())
                .override_global("KERNEL_OFFSETS", &offsets, true)
                .override_global("BACKEND", &code, true)
                .override_global("STOP_WITH_KFUNC", &stop_with_kfunc, true)
                .load(&object)
                .context("loading the eBPF object")
        };
        // Where lsm may be chosen, the object is loaded for it and the probe runs from it: on a
        // kernel that has lsm, the object is loaded once.
        let mut lsm_object = None;
        let lsm = match choice {
            BackendChoice::Auto | BackendChoice::Lsm => {
                let mut ebpf = load(Backend::Lsm)?;
                let probe = run_lsm_probe(&mut ebpf, &kernel_btf).map_err(one_line);
                if probe.is_ok() {
                    lsm_object = Some(ebpf);
                }
                probe
            }
            _ => Err("not asked for".into()),
        };
        let (backend, mut backend_reason) = choice.select(has_kill, &lsm)?;
        if !kfuncs.missing.is_empty() {
            backend_reason += &format!("; kfuncs missing: {}", kfuncs.missing.join(", "));
        }
        let backend_code = backend as u32;
        let stop_with_kfunc = stops_with_kfunc(backend, has_kill);
        let mut ebpf = match lsm_object {
            Some(ebpf) if backend == Backend::Lsm => ebpf,
            _ => load(backend)?,
        };
        std::fs::create_dir_all(dir.join("maps"))
            .with_context(|| format!("creating {}", dir.display()))?;
        for name in maps::ALL {
            ebpf.map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?
                .pin(dir.join("maps").join(name))
                .with_context(|| format!("pinning map {name}"))?;
        }
        let enforcer = Self {
            dir,
            backend,
            backend_reason,
            adopted: false,
            reconciled: 0,
        };
        let mut meta: Array<_, Meta> = Array::try_from(open_pinned(&enforcer.dir, maps::META)?)?;
        meta.set(
            0,
            Meta {
                layout_version: LAYOUT_VERSION,
                backend: backend_code,
                installed_ns: host::monotonic_ns(),
            },
            0,
        )?;
        // Count what already runs in the instances before enforcing: in audit mode, so the
        // agents found running are counted, never stopped.
        let every_type: Vec<String> = types.iter().map(|t| t.name.clone()).collect();
        enforcer.apply_policy(policy, types, &every_type)?;
        attach_and_pin(
            &mut ebpf,
            backend,
            stop_with_kfunc,
            &enforcer.dir,
            &kernel_btf,
        )?;
        drop(ebpf);
        let reconciled = reconcile(&enforcer.dir, types)?;
        enforcer.apply_policy(policy, types, &[])?;
        Ok(Self {
            reconciled,
            ..enforcer
        })
    }

    /// Puts `policy` in force over a running enforcer. The agents already running in the
    /// instances of a type it adds are counted first, in audit mode, as at install: from then
    /// on they are held to their budget, and none is stopped for having run before the type
    /// existed. Returns how many processes were counted so.
    pub fn put_in_force(&self, policy: &Policy, types: &mut [PlacedType]) -> Result<usize> {
        let in_force = self.types_in_force()?;
        let added: Vec<String> = types
            .iter()
            .filter(|t| !in_force.iter().flatten().any(|n| *n == t.name))
            .map(|t| t.name.clone())
            .collect();
        let mut counted = 0;
        if !added.is_empty() {
            self.apply_policy(policy, types, &added)?;
            let new: Vec<PlacedType> = types
                .iter()
                .filter(|t| added.contains(&t.name))
                .cloned()
                .collect();
            counted = reconcile(&self.dir, &new)?;
        }
        self.apply_policy(policy, types, &[])?;
        Ok(counted)
    }

    /// The name of the type in each slot of the policy in force (`None`: free).
    fn types_in_force(&self) -> Result<Vec<Option<String>>> {
        let side = policy_side(&self.dir)?;
        let limits: Array<_, TypeLimits> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_POLICY)?)?;
        let mut names = Vec::new();
        for index in 0..MAX_TYPES {
            let l = limits.get(&policy_index(side, index), 0)?;
            names.push((l.active != 0).then(|| name_of(&l.name)));
        }
        Ok(names)
    }

    /// Puts `policy` in the maps. Types keep their slot (index) across policy changes and
    /// restarts, matched by name, so live counts stay with their type. The types named in
    /// `audit` are loaded in audit mode (while the agents already running in them are counted).
    pub fn apply_policy(
        &self,
        policy: &Policy,
        types: &mut [PlacedType],
        audit: &[String],
    ) -> Result<()> {
        if types.len() > MAX_TYPES as usize {
            bail!("at most {MAX_TYPES} types are supported");
        }
        // The policy in force is on one side of the policy maps; the new one is written whole
        // on the other, then the kernel is switched to it at once (see `switch_policy_side`).
        let side = policy_side(&self.dir)?;
        let next = side ^ 1;
        let mut limits: Array<_, TypeLimits> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_POLICY)?)?;
        let existing = self.types_in_force()?;
        // A removed type's slot keeps counting its instances that still run (their exits give
        // back there): a new type must not inherit those totals.
        let type_state: Array<_, TypeState> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_STATE)?)?;
        let mut holds = Vec::new();
        for index in 0..MAX_TYPES {
            let t = type_state.get(&index, 0)?;
            holds.push(t.tasks != 0 || t.instances != 0);
        }
        // The slot a type's running agents are counted in, when that is no longer their type's
        // (the type was renamed, or removed and added again under another name): the type
        // takes it back with its counts and breaker, so forks and exits meet in one slot.
        let instances: HashMap<_, u64, InstanceState> =
            HashMap::try_from(open_pinned(&self.dir, maps::INSTANCES)?)?;
        let counted_in: Vec<Option<u32>> = types
            .iter()
            .map(|t| {
                cgroupfs::children(&t.dir)
                    .iter()
                    .filter_map(|inst| cgroupfs::cgroup_id(inst).ok())
                    .find_map(|id| instances.get(&id, 0).ok().map(|s| s.type_idx))
            })
            .collect();
        let indices = assign_indices(&existing, &holds, &counted_in, types)?;
        for ((t, index), counted) in types.iter_mut().zip(&indices).zip(&counted_in) {
            t.index = *index;
            let kept = existing[*index as usize].as_deref() == Some(t.name.as_str());
            if !kept && *counted != Some(*index) {
                self.clear_slot(*index)?;
            }
            if counted.is_some_and(|c| c != *index) {
                tracing::warn!(
                    "type {}: running instances at its path are counted in another type's slot \
                     (a type moved away from this path while they run): until they end, they \
                     stay counted there and held to that type's budget; new instances are {}'s",
                    t.name,
                    t.name
                );
            }
        }
        let mut levels: Vec<u32> = Vec::new();
        for t in types.iter() {
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
        // Every slot of the next side: a type no longer in the policy gets an empty one (its
        // instances stop being enforced).
        let mut next_limits = vec![TypeLimits::default(); MAX_TYPES as usize];
        let mut next_breakers = vec![BreakerLimits::default(); MAX_TYPES as usize];
        for (i, t) in types.iter().enumerate() {
            let mut l = type_limits(policy, i);
            if audit.contains(&t.name) {
                l.mode = MODE_AUDIT;
            }
            l.rate_gen = rate_generation(&limits.get(&policy_index(side, t.index), 0)?, &l);
            next_limits[t.index as usize] = l;
            next_breakers[t.index as usize] = breaker_limits(policy, i);
        }
        let mut breakers: Array<_, BreakerLimits> =
            Array::try_from(open_pinned(&self.dir, maps::BREAKER_LIMITS)?)?;
        for index in 0..MAX_TYPES {
            let key = policy_index(next, index);
            limits.set(key, next_limits[index as usize], 0)?;
            breakers.set(key, next_breakers[index as usize], 0)?;
        }
        let mut host: Array<_, HostLimits> =
            Array::try_from(open_pinned(&self.dir, maps::HOST_LIMITS)?)?;
        host.set(next, host_limits(policy), 0)?;
        let mut level_map: Array<_, TypeLevels> =
            Array::try_from(open_pinned(&self.dir, maps::TYPE_LEVELS)?)?;
        let mut type_levels = TypeLevels {
            count: levels.len() as u32,
            ..TypeLevels::default()
        };
        type_levels.levels[..levels.len()].copy_from_slice(&levels);
        level_map.set(next, type_levels, 0)?;
        switch_policy_side(&self.dir, next)?;
        let mut dirs: HashMap<_, u64, TypeDir> =
            HashMap::try_from(open_pinned(&self.dir, maps::TYPE_DIRS)?)?;
        let stale: Vec<u64> = dirs
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !types.iter().any(|t| t.cgroup_id == *id))
            .collect();
        for t in types.iter() {
            let dir = TypeDir {
                type_idx: t.index,
                level: t.level,
            };
            dirs.insert(t.cgroup_id, dir, 0)?;
        }
        for id in stale {
            dirs.remove(&id)?;
        }
        self.follow_type_paths(policy, types)?;
        Ok(())
    }

    /// Clears what a slot's previous type left (its breaker's state and its counters) before a
    /// new type takes it. Its totals are zero: `assign_indices` only hands out such slots.
    fn clear_slot(&self, index: u32) -> Result<()> {
        let mut breakers: Array<_, BreakerState> =
            Array::try_from(open_pinned(&self.dir, maps::BREAKER_STATE)?)?;
        breakers.set(index, BreakerState::default(), 0)?;
        let mut counters: PerCpuArray<_, TypeCounters> =
            PerCpuArray::try_from(open_pinned(&self.dir, maps::TYPE_COUNTERS)?)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("reading {what}: {e}"))?;
        counters.set(
            index,
            PerCpuValues::try_from(vec![TypeCounters::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    /// Writes the type paths for the kernel to follow (`cgroup_mkdir`), and the directories that
    /// stand on them now, so that a type directory (or one on its way) removed and created
    /// again is the type's from its first instant.
    fn follow_type_paths(&self, policy: &Policy, types: &[PlacedType]) -> Result<()> {
        let tree = TypePaths::new(policy, types)?;
        let mut children: HashMap<_, PathKey, PathNode> =
            HashMap::try_from(open_pinned(&self.dir, maps::PATH_CHILDREN)?)?;
        let mut standing: HashMap<_, u64, PathNode> =
            HashMap::try_from(open_pinned(&self.dir, maps::PATH_DIRS)?)?;
        // New paths first, then the directories on them, then what no longer is a path: a
        // directory created meanwhile is followed by the kernel under either policy.
        for (key, node) in &tree.children {
            children.insert(*key, *node, 0)?;
        }
        for (dir, node) in &tree.dirs {
            if let Ok(id) = cgroupfs::cgroup_id(dir) {
                standing.insert(id, *node, 0)?;
            }
        }
        let old_keys: Vec<PathKey> = children
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !tree.children.iter().any(|(key, _)| key == k))
            .collect();
        for k in old_keys {
            children.remove(&k)?;
        }
        let stale: Vec<u64> = standing
            .iter()
            .filter_map(Result::ok)
            .filter(|(id, node)| {
                !tree
                    .dirs
                    .iter()
                    .any(|(dir, n)| n == node && cgroupfs::cgroup_id(dir).is_ok_and(|d| d == *id))
            })
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            standing.remove(&id)?;
        }
        Ok(())
    }

    /// The event ring buffer, handed to the task that reads it.
    pub fn events(&self) -> Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(open_pinned(&self.dir, maps::EVENTS)?)?)
    }
}

/// The fork-rate generation of a type's new limits: the old one while its rate and burst stay
/// (and its slot keeps its owner), else the next, so the kernel starts its instances' buckets
/// full under the new rate.
fn rate_generation(old: &TypeLimits, new: &TypeLimits) -> u32 {
    let same = old.active != 0
        && old.name == new.name
        && old.rate_interval_ns == new.rate_interval_ns
        && old.rate_burst == new.rate_burst;
    if same {
        old.rate_gen
    } else {
        (old.rate_gen + 1) & 0xff
    }
}

/// The type paths as the kernel follows them: node 0 is the cgroup2 mount's root, every other
/// node a directory on the way to a type directory or a type directory. A node's number is a
/// hash of its path, so it stays the same across policy changes and restarts.
struct TypePaths {
    children: Vec<(PathKey, PathNode)>,
    /// Where each node's directory is (the root included).
    dirs: Vec<(PathBuf, PathNode)>,
}

impl TypePaths {
    fn new(policy: &Policy, types: &[PlacedType]) -> Result<Self> {
        let mut tree = Self {
            children: Vec::new(),
            dirs: Vec::new(),
        };
        for (t, placed) in policy.types.iter().zip(types) {
            let parts: Vec<&str> = t.path.split('/').filter(|c| !c.is_empty()).collect();
            // The mount point: the type directory less its path.
            let mut dir = placed.dir.clone();
            for _ in &parts {
                dir.pop();
            }
            if tree.dirs.is_empty() {
                tree.dirs.push((
                    dir.clone(),
                    PathNode {
                        node: 0,
                        type_idx: NO_TYPE,
                        level: placed.level - parts.len() as u32,
                        _pad: 0,
                    },
                ));
            }
            let mut parent = 0;
            for (depth, part) in parts.iter().enumerate() {
                let last = depth + 1 == parts.len();
                let prefix = parts[..=depth].join("/");
                let node = PathNode {
                    node: path_node(&prefix),
                    type_idx: if last { placed.index } else { NO_TYPE },
                    level: placed.level - (parts.len() - depth - 1) as u32,
                    _pad: 0,
                };
                let mut name = [0u8; PATH_NAME_LEN];
                if part.len() > PATH_NAME_LEN - 2 {
                    bail!(
                        "type \"{}\": path component \"{part}\" is longer than {} bytes",
                        t.name,
                        PATH_NAME_LEN - 2
                    );
                }
                name[..part.len()].copy_from_slice(part.as_bytes());
                let key = PathKey {
                    parent,
                    _pad: 0,
                    name,
                };
                dir.push(part);
                match tree.children.iter().find(|(k, _)| *k == key) {
                    // A directory on the way to two types (types never contain each other).
                    Some((_, n)) if n.node == node.node => {}
                    Some(_) => bail!("type path \"{prefix}\" has the node of another path"),
                    None => {
                        if tree.dirs.iter().any(|(_, n)| n.node == node.node) {
                            bail!("type path \"{prefix}\" has the node of another path");
                        }
                        tree.children.push((key, node));
                        tree.dirs.push((dir.clone(), node));
                    }
                }
                parent = node.node;
            }
        }
        if tree.dirs.len() > MAX_PATH_NODES as usize {
            bail!(
                "the type paths have {} directories on them; at most {MAX_PATH_NODES} are supported",
                tree.dirs.len()
            );
        }
        Ok(tree)
    }
}

/// A path's node number: FNV-1a of the path, never 0 (the root's).
fn path_node(path: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in path.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// A type name as the kernel keeps it (NUL-padded).
pub fn name_of(raw: &[u8]) -> String {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Slot of each type: its old slot when a type of that name exists; else the slot its running
/// agents are counted in (`counted_in`), when no type of the policy keeps that one by name; else
/// the first free one that holds no count (`holds`: a removed type's instances still count
/// there), preferring slots no type in force has.
fn assign_indices(
    existing: &[Option<String>],
    holds: &[bool],
    counted_in: &[Option<u32>],
    types: &[PlacedType],
) -> Result<Vec<u32>> {
    let mut taken: Vec<bool> = existing
        .iter()
        .map(|n| {
            n.as_ref()
                .is_some_and(|n| types.iter().any(|t| &t.name == n))
        })
        .collect();
    // In passes, so that no type takes as a free slot the one another's agents count in.
    let mut slots: Vec<Option<u32>> = types
        .iter()
        .map(|t| {
            existing
                .iter()
                .position(|n| n.as_deref() == Some(&t.name))
                .map(|i| i as u32)
        })
        .collect();
    for (slot, counted) in slots.iter_mut().zip(counted_in) {
        if slot.is_none() {
            if let Some(i) = counted.filter(|&i| taken.get(i as usize) == Some(&false)) {
                taken[i as usize] = true;
                *slot = Some(i);
            }
        }
    }
    types
        .iter()
        .zip(slots)
        .map(|(t, slot)| {
            if let Some(i) = slot {
                return Ok(i);
            }
            let free = (0..taken.len())
                .find(|&i| !taken[i] && !holds[i] && existing[i].is_none())
                .or_else(|| (0..taken.len()).find(|&i| !taken[i] && !holds[i]))
                .ok_or_else(|| {
                    anyhow!(
                        "no free type slot for type {:?}: the {MAX_TYPES} slots are in use, some \
                         by removed types whose instances still run (their counts stay there \
                         until they end)",
                        t.name
                    )
                })?;
            taken[free] = true;
            Ok(free as u32)
        })
        .collect()
}

/// Loads every hook, attaches it, and pins the link so the hook outlives this process.
fn attach_and_pin(
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
    for hook in HOOKS {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(hook)
            .ok_or_else(|| anyhow!("program {hook} missing from the eBPF object"))?
            .try_into()?;
        let t = Instant::now();
        prog.load(hook, btf)
            .with_context(|| format!("loading the {hook} program"))?;
        note(hook, t, prog.info().ok());
        let id = prog
            .attach()
            .with_context(|| format!("attaching the {hook} program"))?;
        FdLink::from(prog.take_link(id)?)
            .pin(links.join(hook))
            .with_context(|| format!("pinning the {hook} link"))?;
    }
    if backend == Backend::Lsm {
        // task_free first: a fork admitted by task_alloc must always be released if it fails.
        for hook in ["task_free", "task_alloc"] {
            let prog: &mut Lsm = ebpf
                .program_mut(hook)
                .ok_or_else(|| anyhow!("program {hook} missing from the eBPF object"))?
                .try_into()?;
            let t = Instant::now();
            prog.load(hook, btf)
                .with_context(|| format!("loading the lsm/{hook} program"))?;
            note(hook, t, prog.info().ok());
            let id = prog
                .attach()
                .with_context(|| format!("attaching the lsm/{hook} program"))?;
            FdLink::from(prog.take_link(id)?)
                .pin(links.join(hook))
                .with_context(|| format!("pinning the lsm/{hook} link"))?;
        }
    }
    if !kfunc {
        let prog: &mut RawTracePoint = ebpf
            .program_mut("sys_exit")
            .ok_or_else(|| anyhow!("program sys_exit missing from the eBPF object"))?
            .try_into()?;
        let t = Instant::now();
        prog.load().context("loading the sys_exit program")?;
        note("sys_exit", t, prog.info().ok());
        let id = prog
            .attach("sys_exit")
            .context("attaching the sys_exit program")?;
        FdLink::from(prog.take_link(id)?)
            .pin(links.join("sys_exit"))
            .context("pinning the sys_exit link")?;
    }
    // Loaded, never attached: the daemon runs it on entries it found empty (`settle.rs`).
    {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(SETTLE_PROGRAM)
            .ok_or_else(|| anyhow!("program {SETTLE_PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        let t = Instant::now();
        prog.load().context("loading the settle program")?;
        note(SETTLE_PROGRAM, t, prog.info().ok());
        let programs = dir.join("programs");
        std::fs::create_dir_all(&programs)
            .with_context(|| format!("creating {}", programs.display()))?;
        prog.pin(programs.join(SETTLE_PROGRAM))
            .context("pinning the settle program")?;
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

/// Counts the agents that already run: each process in an instance is written back into its
/// own cgroup, which fires the migration hook for it (the kernel moves nothing). The hook
/// counts the whole process, exactly as if it had just moved in; processes forked meanwhile are
/// already counted and skipped. Returns how many processes were written.
fn reconcile(dir: &Path, types: &[PlacedType]) -> Result<usize> {
    let mut created: HashMap<_, u64, u64> = HashMap::try_from(open_pinned(dir, maps::CREATED)?)?;
    let (now_mono, now_wall) = (host::monotonic_ns(), std::time::SystemTime::now());
    let mut count = 0;
    for t in types {
        for inst in cgroupfs::children(&t.dir) {
            // Age counts from the instance's creation, also for instances older than us (the
            // directory's time is the best guess there is for those).
            if let (Ok(id), Ok(meta)) = (cgroupfs::cgroup_id(&inst), std::fs::metadata(&inst)) {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| now_wall.duration_since(m).ok())
                    .map_or(0, |d| d.as_nanos() as u64);
                let _ = created.insert(id, now_mono.saturating_sub(age), BPF_NOEXIST);
            }
            for cg in cgroupfs::subtree(&inst) {
                for pid in cgroupfs::procs(&cg) {
                    if cgroupfs::move_process(&cg, pid).is_ok() {
                        count += 1;
                    }
                }
            }
        }
    }
    Ok(count)
}

const BPF_NOEXIST: u64 = 1;

/// How long `uninstall` waits for the kernel to detach the programs.
const DETACH_WAIT: Duration = Duration::from_secs(30);

/// Detaches and removes every pinned enforcer (all layouts), and returns once the kernel runs
/// none of its programs. A pin is a pinned link's last reference (the daemon keeps no program
/// or link open), and the kernel drops it after an RCU grace period, from a workqueue: without
/// the wait, a fork right after `uninstall` could still be refused (seen on 5.10 under qemu).
pub fn uninstall() -> Result<bool> {
    let root = Path::new(PIN_ROOT);
    if !root.exists() {
        return Ok(false);
    }
    let programs = pinned_programs(root);
    std::fs::remove_dir_all(root).with_context(|| format!("removing {PIN_ROOT}"))?;
    let started = Instant::now();
    let deadline = started + DETACH_WAIT;
    loop {
        let left = aya::programs::loaded_programs()
            .flatten()
            .filter(|p| programs.contains(&p.id()))
            .count();
        if left == 0 {
            tracing::debug!(
                "the kernel let go of {} programs {} ms after their pins went",
                programs.len(),
                started.elapsed().as_millis()
            );
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!(
                "removed {PIN_ROOT}, but after {} s the kernel still runs {left} of its programs",
                DETACH_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The programs behind the links pinned under `root` (every layout's `links/`).
fn pinned_programs(root: &Path) -> Vec<u32> {
    let links = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|layout| {
            std::fs::read_dir(layout.path().join("links"))
                .into_iter()
                .flatten()
        })
        .flatten();
    links
        .filter_map(|entry| PinnedLink::from_pin(entry.path()).ok())
        .filter_map(|pinned| FdLink::from(pinned).info().ok())
        .map(|info| info.program_id())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(policy: &Policy, mount: &str) -> Vec<PlacedType> {
        let cg = Cgroup2 {
            mount: mount.into(),
            root: "/".into(),
        };
        policy
            .types
            .iter()
            .enumerate()
            .map(|(i, t)| PlacedType {
                name: t.name.clone(),
                index: i as u32 + 7,
                cgroup_id: 0,
                dir: cg.dir(&t.path),
                level: cg.level(&t.path),
                mode: Mode::Enforce,
                max_tasks: t.max_tasks,
                max_threads: t.max_threads,
                max_age: None,
                on_max_age: OnMaxAge::Event,
                backstop: None,
            })
            .collect()
    }

    #[test]
    fn a_new_type_never_takes_a_slot_that_still_counts_a_removed_type() {
        let text = "[[type]]\nname = \"kept\"\npath = \"a/k\"\nmax_tasks = 5\n\
                    [[type]]\nname = \"new\"\npath = \"a/n\"\nmax_tasks = 5\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let types = placed(&policy, "/cg");
        let none = vec![None; types.len()];
        let mut existing = vec![None; MAX_TYPES as usize];
        existing[0] = Some("removed".to_string());
        existing[1] = Some("kept".to_string());
        let mut holds = vec![false; MAX_TYPES as usize];
        // Slot 0: the removed type's instances still run. Slot 2: an older removed type's.
        holds[0] = true;
        holds[2] = true;
        assert_eq!(
            assign_indices(&existing, &holds, &none, &types).unwrap(),
            vec![1, 3],
            "kept keeps its slot; new skips the slots that still count"
        );
        // Once those instances ended, their slots are free again.
        let holds = vec![false; MAX_TYPES as usize];
        assert_eq!(
            assign_indices(&existing, &holds, &none, &types).unwrap(),
            vec![1, 2]
        );
        // Every free slot still counting: a clear error, nothing assigned.
        let mut holds = vec![true; MAX_TYPES as usize];
        holds[1] = false;
        let e = assign_indices(&existing, &holds, &none, &types).unwrap_err();
        assert!(
            e.to_string().contains("no free type slot for type \"new\""),
            "{e}"
        );
    }

    #[test]
    fn a_renamed_type_takes_back_the_slot_its_agents_count_in() {
        let text = "[[type]]\nname = \"kept\"\npath = \"a/k\"\nmax_tasks = 5\n\
                    [[type]]\nname = \"renamed\"\npath = \"a/r\"\nmax_tasks = 5\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let types = placed(&policy, "/cg");
        let mut existing = vec![None; MAX_TYPES as usize];
        existing[0] = Some("kept".to_string());
        existing[4] = Some("old-name".to_string());
        let mut holds = vec![false; MAX_TYPES as usize];
        holds[4] = true;
        // Renamed in this change (slot 4 had the old name), or removed earlier and added again
        // now (slot 4 empty but still counting): the agents' slot, counts and all.
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(4)], &types).unwrap(),
            vec![0, 4]
        );
        existing[4] = None;
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(4)], &types).unwrap(),
            vec![0, 4]
        );
        // Never a slot another type keeps by name: then the first free one.
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(0)], &types).unwrap(),
            vec![0, 1]
        );
        // A type placed earlier never takes the counted slot as a free one.
        let existing = vec![None; MAX_TYPES as usize];
        let holds = vec![false; MAX_TYPES as usize];
        assert_eq!(
            assign_indices(&existing, &holds, &[None, Some(0)], &types).unwrap(),
            vec![1, 0]
        );
    }

    #[test]
    fn type_paths_are_one_tree_with_stable_nodes() {
        let text = "[[type]]\nname = \"a\"\npath = \"agents/a\"\nmax_tasks = 5\n\
                    [[type]]\nname = \"b\"\npath = \"agents/deep/b\"\nmax_tasks = 5\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let tree = TypePaths::new(&policy, &placed(&policy, "/cg")).unwrap();
        // root, agents, agents/a, agents/deep, agents/deep/b: "agents" once.
        let dirs: Vec<String> = tree
            .dirs
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "/cg",
                "/cg/agents",
                "/cg/agents/a",
                "/cg/agents/deep",
                "/cg/agents/deep/b"
            ]
        );
        assert_eq!(tree.children.len(), 4);
        let node = |d: &str| tree.dirs.iter().find(|(p, _)| p.ends_with(d)).unwrap().1;
        assert_eq!(node("/cg").node, 0);
        assert_eq!(node("agents").type_idx, NO_TYPE);
        assert_eq!(node("agents/a").type_idx, 7);
        assert_eq!(node("deep/b").type_idx, 8);
        assert_eq!(node("deep/b").level, 3);
        // A child is keyed by its parent's node and its own name.
        let (key, b) = tree.children.iter().find(|(_, n)| n.type_idx == 8).unwrap();
        assert_eq!(key.parent, node("agents/deep").node);
        assert_eq!(&key.name[..2], b"b\0");
        assert_eq!(b.node, path_node("agents/deep/b"));
        // The same paths in another policy have the same nodes.
        let again = TypePaths::new(&policy, &placed(&policy, "/cg")).unwrap();
        assert_eq!(again.children, tree.children);
    }

    #[test]
    fn a_rate_change_moves_the_generation() {
        let text = "[[type]]\nname = \"a\"\npath = \"a\"\nmax_tasks = 5\n\
                    fork_rate = { burst = 4, per_sec = 0.1 }\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let mut old = type_limits(&policy, 0);
        old.rate_gen = 255;
        let mut same = type_limits(&policy, 0);
        same.max_tasks = 6;
        assert_eq!(rate_generation(&old, &same), 255, "other limits keep it");
        let mut faster = same;
        faster.rate_burst = 5;
        assert_eq!(
            rate_generation(&old, &faster),
            0,
            "a new burst moves it (mod 256)"
        );
        assert_eq!(
            rate_generation(&TypeLimits::default(), &same),
            1,
            "a slot with a new owner moves it"
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

    /// The state file of a running daemon is read by the CLI of another build: its words stay.
    #[test]
    fn the_state_file_names_backends_and_modes_as_words() {
        let policy = Policy::parse(
            "[[type]]\nname = \"a\"\npath = \"a\"\nmax_tasks = 5\n",
            "p.toml",
        )
        .unwrap();
        let mut types = placed(&policy, "/cg");
        types[0].mode = Mode::Audit;
        let state = DaemonState {
            pid: 1,
            backend: Backend::KillCompat,
            cgroup2: "/cg".into(),
            types,
        };
        let v = serde_json::to_value(&state).unwrap();
        assert_eq!(v["backend"], "kill-compat");
        assert_eq!(v["types"][0]["mode"], "audit");
        let back: DaemonState = serde_json::from_value(v).unwrap();
        assert_eq!(
            (back.backend, &back.types),
            (Backend::KillCompat, &state.types)
        );
        for (backend, name) in [(Backend::Lsm, "lsm"), (Backend::Kill, "kill")] {
            assert_eq!(serde_json::to_value(backend).unwrap(), name);
        }
        assert_eq!(serde_json::to_value(Mode::Enforce).unwrap(), "enforce");
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
