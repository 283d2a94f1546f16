//! `spawnguard doctor`: what this host offers spawnguard, which backend `auto` would choose and
//! why, and one line of advice for each missing piece.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    btf::Btf,
    cgroupfs,
    host::{self, ATOMICS_KERNEL, MIN_KERNEL},
    loader,
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
    let mut checks = Vec::new();
    let release = host::kernel_release();
    let root = host::is_root();
    checks.push(if root {
        check("root", Level::Ok, "running as root", None)
    } else {
        check(
            "root",
            Level::Fatal,
            "not root: the kernel checks below need root",
            Some("run spawnguard (and this check) as root"),
        )
    });
    let version = host::kernel_version(&release);
    checks.push(match version {
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
    });

    let btf = Btf::from_sys_fs();
    checks.push(match &btf {
        Ok(b) => match b.kernel_offsets() {
            Ok(_) => check(
                "btf",
                Level::Ok,
                "/sys/kernel/btf/vmlinux: every struct offset spawnguard reads is there",
                None,
            ),
            Err(e) => check(
                "btf",
                Level::Fatal,
                format!("{e}"),
                Some("report this kernel to spawnguard: a struct it reads has changed"),
            ),
        },
        Err(e) => check(
            "btf",
            Level::Fatal,
            format!("{e}"),
            Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distributions)"),
        ),
    });
    let has_kfunc = btf
        .as_ref()
        .is_ok_and(|b| b.func_id(loader::KILL_KFUNC).is_some());
    checks.push(if has_kfunc {
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
    });

    // The kernel lists its LSMs in securityfs: mounted here if missing (as `run` mounts bpffs).
    let mounted = root && cgroupfs::ensure_securityfs().unwrap_or(false);
    let lsms = std::fs::read_to_string(LSM_LIST).ok().map(|l| {
        if mounted {
            format!("{} (mounted securityfs to read it)", l.trim())
        } else {
            l
        }
    });
    let bpf_lsm = lsms
        .as_deref()
        .is_some_and(|l| l.split([',', ' ']).any(|m| m == "bpf"));
    checks.push(match &lsms {
        Some(list) if bpf_lsm => check("lsm list", Level::Ok, list.trim(), None),
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
    });
    let probe = match &btf {
        Ok(b) if root => loader::probe_lsm_reason(b),
        _ => Err("not tried (needs root and BTF)".into()),
    };
    checks.push(match &probe {
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
    });

    let cgroup2 = cgroupfs::Cgroup2::discover();
    checks.push(match &cgroup2 {
        Ok(cg) => {
            let controllers =
                std::fs::read_to_string(cg.mount.join("cgroup.controllers")).unwrap_or_default();
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
                    match controllers.trim() {
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
            format!("{e}"),
            Some("mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified), or boot with systemd.unified_cgroup_hierarchy=1"),
        ),
    });
    for (path, mounted) in cgroupfs::pseudo_filesystems() {
        let name = if path == cgroupfs::BPF_FS {
            "bpffs"
        } else {
            "tracefs"
        };
        checks.push(if mounted {
            check(name, Level::Ok, format!("mounted at {path}"), None)
        } else {
            check(
                name,
                Level::Warn,
                format!("not mounted at {path}"),
                Some("`spawnguard run` mounts it at start"),
            )
        });
    }
    let installed = loader::pin_dir();
    checks.push(if installed.join("links").exists() {
        let daemon = loader::DaemonState::read()
            .map(|d| d.pid)
            .filter(|&p| host::pid_alive(p));
        check(
            "enforcer",
            Level::Ok,
            match daemon {
                Some(pid) => format!("installed at {}, daemon pid {pid}", installed.display()),
                None => format!(
                    "installed at {}, daemon not running (the last policy is enforced)",
                    installed.display()
                ),
            },
            None,
        )
    } else {
        check(
            "enforcer",
            Level::Ok,
            "not installed (`spawnguard run` installs it)",
            None,
        )
    });
    // Maps filling up (an installed enforcer only): warned well before they are full.
    if installed.join("links").exists() {
        if let Ok(s) = crate::status::snapshot() {
            for u in &s.maps {
                let name = format!("map {}", u.map);
                checks.push(match u.warning() {
                    Some(w) => check(&name, Level::Warn, w, None),
                    None => check(
                        &name,
                        Level::Ok,
                        format!("{}/{} entries", u.entries, u.capacity),
                        None,
                    ),
                });
            }
        }
    }

    let can_run = checks.iter().all(|c| c.level != Level::Fatal);
    let (backend, backend_reason) = if can_run {
        match loader::BackendChoice::Auto.select(has_kfunc, &probe) {
            Ok((b, why)) => (Some(b.name().to_owned()), why),
            Err(e) => (None, format!("{e:#}")),
        }
    } else {
        (
            None,
            "spawnguard cannot run here: see the fatal checks".to_owned(),
        )
    };
    Report {
        kernel: release,
        checks,
        backend,
        backend_reason,
        can_run,
    }
}

pub fn print_table(r: &Report) {
    println!("{:<18} {:<6} DETAIL", "CHECK", "STATUS");
    for c in &r.checks {
        let level = match c.level {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fatal => "FATAL",
        };
        println!("{:<18} {:<6} {}", c.name, level, c.detail);
    }
    println!();
    match &r.backend {
        Some(b) => println!("backend `auto` would choose: {b}: {}", r.backend_reason),
        None => println!("{}", r.backend_reason),
    }
    let advice: Vec<_> = r
        .checks
        .iter()
        .filter_map(|c| Some((c.name.as_str(), c.advice.as_deref()?)))
        .collect();
    if !advice.is_empty() {
        println!("\nadvice:");
        for (name, a) in advice {
            println!("  {name}: {a}");
        }
    }
}
