//! Installing the enforcer, or adopting the one pinned: the checks before, the backend and the
//! object to load, the maps pinned, the policy put in force around the attach and the count of
//! what already runs.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, MapData, RingBuf},
    Ebpf, EbpfLoader,
};
use spawnguard_common::{maps, KernelOffsets, Meta, LAYOUT_VERSION};

use super::{
    attach::attach_and_pin,
    backend::{one_line, run_lsm_probe, stops_with_kfunc},
    check_no_other_layout, emulated_atomics,
    object::{ebpf_object, VERIFIER_LOG},
    open_pinned, pin_dir,
    reconcile::reconcile,
    Backend, BackendChoice, PlacedType, EMULATED_ATOMICS_ENV, KILL_KFUNC,
};
use crate::{btf::Btf, host, kfunc::patch_kfunc_calls, policy::Policy};

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
    /// Counted processes. Only the reliability drills shrink it (hidden `run` flag
    /// `--test-process-capacity`): filling 65,536 real processes does not fit a test.
    pub processes: u32,
    /// Tasks being stopped at once. Shrunk only by the drills, as `processes`.
    pub doomed: u32,
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self {
            instances: spawnguard_common::MAX_INSTANCES,
            processes: spawnguard_common::MAX_PROCESSES,
            doomed: spawnguard_common::MAX_DOOMED,
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

/// The eBPF object (its kfunc calls patched) loaded for `backend`, its maps created, no program
/// loaded yet. The daemon's install and the verifier-steps report (`verifier.rs`) both load
/// through here, so what the report measures is what the daemon loads.
pub(super) fn load_object(
    object: &[u8],
    offsets: &KernelOffsets,
    backend: Backend,
    has_kill: bool,
    capacity: MapCapacity,
) -> Result<Ebpf> {
    let code = backend as u32;
    let stop_with_kfunc = u32::from(stops_with_kfunc(backend, has_kill));
    EbpfLoader::new()
        .verifier_log_level(VERIFIER_LOG)
        .map_max_entries(maps::INSTANCES, capacity.instances)
        .map_max_entries(maps::CREATED, capacity.created())
        .map_max_entries(maps::PROCESSES, capacity.processes)
        .map_max_entries(maps::DOOMED, capacity.doomed)
        .override_global("KERNEL_OFFSETS", offsets, true)
        .override_global("BACKEND", &code, true)
        .override_global("STOP_WITH_KFUNC", &stop_with_kfunc, true)
        .load(object)
        .context("loading the eBPF object")
}

/// A directory in the pin directory while an install is under way.
const INSTALLING: &str = "installing";

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
        if dir.join(INSTALLING).exists() {
            // Its daemon was killed part-way through the install: some hooks may be missing
            // and nothing was reconciled, so adopting it would enforce with holes.
            tracing::warn!(
                "{} holds a half-finished install (its daemon was killed during it): removing \
                 it and installing again",
                dir.display()
            );
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the half-finished {}", dir.display()))?;
        }
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
        let load = |backend: Backend| load_object(&object, &offsets, backend, has_kill, capacity);
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
        // Removed once the install is complete: a daemon killed before that leaves it, and the
        // next one installs again rather than adopting a partial set of hooks.
        // A directory: bpffs holds no regular files.
        std::fs::create_dir(dir.join(INSTALLING))
            .with_context(|| format!("marking {} as being installed", dir.display()))?;
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
        std::fs::remove_dir(enforcer.dir.join(INSTALLING))
            .with_context(|| format!("completing the install in {}", enforcer.dir.display()))?;
        Ok(Self {
            reconciled,
            ..enforcer
        })
    }

    /// The event ring buffer, handed to the task that reads it.
    pub fn events(&self) -> Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(open_pinned(&self.dir, maps::EVENTS)?)?)
    }
}
