//! `spawnguard doctor`: what this host offers spawnguard, which backend `auto` would choose and
//! why, and one line of advice for each missing piece.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    btf::{Btf, BtfError},
    cgroupfs,
    host::{self, ATOMICS_KERNEL, MIN_KERNEL},
    loader,
    status::MapUsage,
};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    /// Missing, but spawnguard runs (a backend is unavailable, or `run` fixes it).
    Warn,
    /// spawnguard cannot run until this is fixed.
    Fatal,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    pub advice: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
    /// What `spawnguard run --backend auto` would use, and why (None: it cannot run).
    pub backend: Option<String>,
    pub backend_reason: String,
    pub can_run: bool,
}

fn check(name: &str, level: Level, detail: impl Into<String>, advice: Option<&str>) -> Check {
    Check {
        name: name.to_owned(),
        level,
        detail: detail.into(),
        advice: advice.map(str::to_owned),
    }
}

const LSM_LIST: &str = "/sys/kernel/security/lsm";

pub fn run() -> Report {
    let host = HostFacts::read();
    let checks = host.checks();
    let can_run = checks.iter().all(|c| c.level != Level::Fatal);
    let (backend, backend_reason) = backend_choice(can_run, host.has_kfunc, &host.lsm_probe);
    Report {
        kernel: host.release,
        checks,
        backend,
        backend_reason,
        can_run,
    }
}

/// What doctor reads from the host, each once: several checks and the backend choice share it.
struct HostFacts {
    release: String,
    root: bool,
    btf: Result<Btf, BtfError>,
    /// The kill backend's kfunc is in the kernel's BTF.
    has_kfunc: bool,
    /// The kernel's LSM list (None: unreadable), noting when doctor mounted securityfs to read it.
    lsm_list: Option<String>,
    /// Whether an lsm program loads and attaches here, or why not.
    lsm_probe: Result<(), String>,
    cgroup2: Result<Cgroup2Mount, String>,
    /// (mount point, mounted) of bpffs and tracefs.
    pseudo_filesystems: [(&'static str, bool); 2],
    /// None: no enforcer is installed.
    enforcer: Option<Enforcer>,
}

struct Cgroup2Mount {
    mount: PathBuf,
    /// `cgroup.controllers` of the mount.
    controllers: String,
}

/// An installed enforcer.
struct Enforcer {
    dir: PathBuf,
    /// The daemon's pid, if it runs.
    daemon: Option<u32>,
    /// How full the kernel's hash maps are (empty if they could not be read).
    maps: Vec<MapUsage>,
}

impl HostFacts {
    /// Reads the host in the order the checks need it: securityfs is mounted before the LSM
    /// list is read, and the lsm probe runs only as root with BTF.
    fn read() -> Self {
        let release = host::kernel_release();
        let root = host::is_root();
        let btf = Btf::from_sys_fs();
        let has_kfunc = btf
            .as_ref()
            .is_ok_and(|b| b.func_id(loader::KILL_KFUNC).is_some());
        // The kernel lists its LSMs in securityfs: mounted here if missing (as `run` mounts
        // bpffs).
        let mounted = root && cgroupfs::ensure_securityfs().unwrap_or(false);
        let lsm_list = std::fs::read_to_string(LSM_LIST).ok().map(|l| {
            if mounted {
                format!("{} (mounted securityfs to read it)", l.trim())
            } else {
                l
            }
        });
        let lsm_probe = match &btf {
            Ok(b) if root => loader::probe_lsm_reason(b),
            _ => Err("not tried (needs root and BTF)".into()),
        };
        let cgroup2 = cgroupfs::Cgroup2::discover()
            .map(|cg| Cgroup2Mount {
                controllers: std::fs::read_to_string(cg.mount.join("cgroup.controllers"))
                    .unwrap_or_default(),
                mount: cg.mount,
            })
            .map_err(|e| format!("{e}"));
        let pseudo_filesystems = cgroupfs::pseudo_filesystems();
        Self {
            release,
            root,
            btf,
            has_kfunc,
            lsm_list,
            lsm_probe,
            cgroup2,
            pseudo_filesystems,
            enforcer: Enforcer::read(),
        }
    }

    /// Every check, in the order the report lists them.
    fn checks(&self) -> Vec<Check> {
        let mut checks = vec![
            root_check(self.root),
            kernel_check(&self.release),
            btf_check(&self.btf),
            kfunc_check(self.has_kfunc),
            lsm_list_check(self.lsm_list.as_deref()),
            lsm_programs_check(&self.lsm_probe, lists_bpf(self.lsm_list.as_deref())),
            cgroup2_check(&self.cgroup2),
        ];
        checks.extend(
            self.pseudo_filesystems
                .iter()
                .map(|&(path, mounted)| pseudo_filesystem_check(path, mounted)),
        );
        checks.push(enforcer_check(self.enforcer.as_ref()));
        // Maps filling up (an installed enforcer only): warned well before they are full.
        if let Some(e) = &self.enforcer {
            checks.extend(e.maps.iter().map(map_check));
        }
        checks
    }
}

impl Enforcer {
    fn read() -> Option<Self> {
        let dir = loader::pin_dir();
        if !dir.join("links").exists() {
            return None;
        }
        let daemon = loader::DaemonState::read()
            .map(|d| d.pid)
            .filter(|&p| host::pid_alive(p));
        let maps = crate::status::snapshot().map_or_else(|_| Vec::new(), |s| s.maps);
        Some(Self { dir, daemon, maps })
    }
}

fn root_check(root: bool) -> Check {
    if root {
        check("root", Level::Ok, "running as root", None)
    } else {
        check(
            "root",
            Level::Fatal,
            "not root: the kernel checks below need root",
            Some("run spawnguard (and this check) as root"),
        )
    }
}

fn kernel_check(release: &str) -> Check {
    match host::kernel_version(release) {
        Some(v) if v >= ATOMICS_KERNEL => check(
            "kernel",
            Level::Ok,
            format!("{release} (minimum {}.{})", MIN_KERNEL.0, MIN_KERNEL.1),
            None,
        ),
        Some(v) if v >= MIN_KERNEL => check(
            "kernel",
            Level::Ok,
            format!(
                "{release} (minimum {}.{}); no BPF atomic fetch or compare-and-swap before \
                 {}.{}: emulated with a lock in a map",
                MIN_KERNEL.0, MIN_KERNEL.1, ATOMICS_KERNEL.0, ATOMICS_KERNEL.1
            ),
            None,
        ),
        _ => check(
            "kernel",
            Level::Fatal,
            format!(
                "{release}: older than {}.{} (BTF tracepoints, BPF LSM, ring buffers)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            Some("upgrade the kernel to 5.10 or newer"),
        ),
    }
}

fn btf_check(btf: &Result<Btf, BtfError>) -> Check {
    match btf.as_ref().map(Btf::kernel_offsets) {
        Ok(Ok(_)) => check(
            "btf",
            Level::Ok,
            "/sys/kernel/btf/vmlinux: every struct offset spawnguard reads is there",
            None,
        ),
        Ok(Err(e)) => check(
            "btf",
            Level::Fatal,
            format!("{e}"),
            Some("report this kernel to spawnguard: a struct it reads has changed"),
        ),
        Err(e) => check(
            "btf",
            Level::Fatal,
            format!("{e}"),
            Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distributions)"),
        ),
    }
}

fn kfunc_check(has_kfunc: bool) -> Check {
    if has_kfunc {
        check(
            "kfunc",
            Level::Ok,
            "bpf_send_signal_task present: the kill backend can run",
            None,
        )
    } else {
        check(
            "kfunc",
            Level::Warn,
            "bpf_send_signal_task missing (kernel < 6.13): no kill backend",
            Some(
                "kill-compat, and lsm for what task_alloc cannot refuse (migrations), use a \
                 hook on every syscall exit instead (about +130 ns a syscall); a 6.13+ kernel \
                 removes that cost",
            ),
        )
    }
}

/// `bpf` is one of the LSMs the kernel lists.
fn lists_bpf(lsm_list: Option<&str>) -> bool {
    lsm_list.is_some_and(|l| l.split([',', ' ']).any(|m| m == "bpf"))
}

fn lsm_list_check(lsm_list: Option<&str>) -> Check {
    match lsm_list {
        Some(list) if lists_bpf(lsm_list) => check("lsm list", Level::Ok, list.trim(), None),
        Some(list) => check(
            "lsm list",
            Level::Warn,
            format!("{} (no bpf)", list.trim()),
            Some(&format!(
                "add bpf to the kernel command line's LSM list (lsm={},bpf) to allow the \
                 lsm backend",
                list.split(' ').next().unwrap_or_default().trim()
            )),
        ),
        None => check(
            "lsm list",
            Level::Warn,
            format!("{LSM_LIST} unreadable (securityfs not mounted?)"),
            Some("mount securityfs: mount -t securityfs none /sys/kernel/security"),
        ),
    }
}

/// `bpf_lsm`: the LSM list names bpf, so a failed probe is the kernel refusing trampolines.
fn lsm_programs_check(probe: &Result<(), String>, bpf_lsm: bool) -> Check {
    match probe {
        Ok(()) => check(
            "bpf lsm programs",
            Level::Ok,
            "an lsm/task_alloc program loads and attaches",
            None,
        ),
        Err(e) => check(
            "bpf lsm programs",
            Level::Warn,
            e.clone(),
            Some(if bpf_lsm {
                "this kernel refuses BPF trampolines (a hypervisor or lockdown policy): the lsm \
                 backend cannot run here"
            } else {
                "needs bpf in the LSM list (see above) and CONFIG_BPF_LSM=y"
            }),
        ),
    }
}

fn cgroup2_check(cgroup2: &Result<Cgroup2Mount, String>) -> Check {
    match cgroup2 {
        Ok(cg) => {
            let hybrid = cg.mount != Path::new("/sys/fs/cgroup");
            check(
                "cgroup2",
                Level::Ok,
                format!(
                    "{}{}; controllers: {}",
                    cg.mount.display(),
                    if hybrid {
                        " (hybrid: other controllers are on cgroup v1)"
                    } else {
                        ""
                    },
                    match cg.controllers.trim() {
                        "" => "none",
                        c => c,
                    }
                ),
                None,
            )
        }
        Err(e) => check(
            "cgroup2",
            Level::Fatal,
            e.clone(),
            Some("mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified), or boot with systemd.unified_cgroup_hierarchy=1"),
        ),
    }
}

/// bpffs or tracefs at `path`.
fn pseudo_filesystem_check(path: &str, mounted: bool) -> Check {
    let name = if path == cgroupfs::BPF_FS {
        "bpffs"
    } else {
        "tracefs"
    };
    if mounted {
        check(name, Level::Ok, format!("mounted at {path}"), None)
    } else {
        check(
            name,
            Level::Warn,
            format!("not mounted at {path}"),
            Some("`spawnguard run` mounts it at start"),
        )
    }
}

fn enforcer_check(enforcer: Option<&Enforcer>) -> Check {
    let detail = match enforcer {
        None => "not installed (`spawnguard run` installs it)".to_owned(),
        Some(Enforcer {
            dir,
            daemon: Some(pid),
            ..
        }) => format!("installed at {}, daemon pid {pid}", dir.display()),
        Some(Enforcer {
            dir, daemon: None, ..
        }) => format!(
            "installed at {}, daemon not running (the last policy is enforced)",
            dir.display()
        ),
    };
    check("enforcer", Level::Ok, detail, None)
}

fn map_check(u: &MapUsage) -> Check {
    let name = format!("map {}", u.map);
    match u.warning() {
        Some(w) => check(&name, Level::Warn, w, None),
        None => check(
            &name,
            Level::Ok,
            format!("{}/{} entries", u.entries, u.capacity),
            None,
        ),
    }
}

/// What `run --backend auto` would choose, and why (None: it cannot run).
fn backend_choice(
    can_run: bool,
    has_kfunc: bool,
    lsm_probe: &Result<(), String>,
) -> (Option<String>, String) {
    if !can_run {
        return (
            None,
            "spawnguard cannot run here: see the fatal checks".to_owned(),
        );
    }
    match loader::BackendChoice::Auto.select(has_kfunc, lsm_probe) {
        Ok((b, why)) => (Some(b.name().to_owned()), why),
        Err(e) => (None, format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_check_knows_the_minimum_and_the_atomics() {
        let detail = |r: &str| {
            let c = kernel_check(r);
            (c.level, c.detail)
        };
        assert_eq!(
            detail("6.18.1"),
            (Level::Ok, "6.18.1 (minimum 5.10)".into())
        );
        let (level, d) = detail("5.10.0-28-amd64");
        assert_eq!(level, Level::Ok);
        assert!(d.contains("emulated with a lock in a map"), "{d}");
        assert_eq!(detail("4.19.0").0, Level::Fatal);
        assert_eq!(detail("unknown").0, Level::Fatal);
    }

    #[test]
    fn lsm_checks_tell_a_missing_bpf_from_a_refused_program() {
        assert_eq!(
            lsm_list_check(Some("lockdown,capability,bpf")).level,
            Level::Ok
        );
        let c = lsm_list_check(Some("lockdown,capability\n"));
        assert_eq!(
            (c.level, c.detail.as_str()),
            (Level::Warn, "lockdown,capability (no bpf)")
        );
        assert!(
            c.advice.unwrap().contains("(lsm=lockdown,capability,bpf)"),
            "the advice keeps the current list"
        );
        assert_eq!(lsm_list_check(None).level, Level::Warn);
        assert!(lists_bpf(Some("bpf")) && !lists_bpf(Some("bpfx")) && !lists_bpf(None));
        let refused = Err("loading: Operation not permitted".to_owned());
        let advice = |bpf_lsm| lsm_programs_check(&refused, bpf_lsm).advice.unwrap();
        assert!(advice(true).contains("refuses BPF trampolines"));
        assert!(advice(false).contains("needs bpf in the LSM list"));
        assert_eq!(lsm_programs_check(&Ok(()), false).level, Level::Ok);
    }

    #[test]
    fn filesystem_checks_name_what_they_found() {
        let cg = |mount: &str, controllers: &str| {
            cgroup2_check(&Ok(Cgroup2Mount {
                mount: mount.into(),
                controllers: controllers.into(),
            }))
            .detail
        };
        assert_eq!(
            cg("/sys/fs/cgroup", "cpu pids\n"),
            "/sys/fs/cgroup; controllers: cpu pids"
        );
        assert_eq!(
            cg("/sys/fs/cgroup/unified", ""),
            "/sys/fs/cgroup/unified (hybrid: other controllers are on cgroup v1); controllers: none"
        );
        assert_eq!(cgroup2_check(&Err("no cgroup2".into())).level, Level::Fatal);
        let bpffs = pseudo_filesystem_check(cgroupfs::BPF_FS, false);
        assert_eq!((bpffs.name.as_str(), bpffs.level), ("bpffs", Level::Warn));
        let tracefs = pseudo_filesystem_check(cgroupfs::TRACEFS, true);
        assert_eq!(
            (tracefs.name.as_str(), tracefs.level),
            ("tracefs", Level::Ok)
        );
    }

    #[test]
    fn enforcer_check_says_whether_a_daemon_runs() {
        let enforcer = |daemon| Enforcer {
            dir: "/sys/fs/bpf/spawnguard/v1".into(),
            daemon,
            maps: vec![],
        };
        assert_eq!(
            enforcer_check(None).detail,
            "not installed (`spawnguard run` installs it)"
        );
        assert_eq!(
            enforcer_check(Some(&enforcer(Some(7)))).detail,
            "installed at /sys/fs/bpf/spawnguard/v1, daemon pid 7"
        );
        assert!(enforcer_check(Some(&enforcer(None)))
            .detail
            .ends_with("daemon not running (the last policy is enforced)"));
    }

    #[test]
    fn no_backend_is_chosen_when_a_check_is_fatal() {
        assert_eq!(
            backend_choice(false, true, &Ok(())),
            (
                None,
                "spawnguard cannot run here: see the fatal checks".to_owned()
            )
        );
        assert!(backend_choice(true, true, &Ok(())).0.is_some());
    }
}
