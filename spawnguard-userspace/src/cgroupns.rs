//! The host's cgroup namespace, for a daemon in a container. A container on cgroup v2 gets a
//! cgroup namespace of its own by default (Kubernetes has no field to ask for the host's): in
//! it `/proc/PID/cgroup` names paths from the container's own cgroup, and the root of the
//! host's cgroup2 mount, bound into the container, shows as `/../..`. The enforcer's type and
//! instance paths must be the host's, so `spawnguard run` first makes sure it is in the host's
//! namespace, joining it when it can (`setns`), before anything reads a cgroup path.
//!
//! The host's namespace is the one of the host's pid 1 (so it is found only in the host's PID
//! namespace). Where pid 1's cannot be read (ptrace rules: a sandbox's pid 1 may refuse even
//! root), the kernel's fixed inode number of the first cgroup namespace still identifies it:
//! kthreadd (pid 2 of the first PID namespace) is always in it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
};

/// The number Linux gives the first (boot) cgroup namespace's inode (`PROC_CGROUP_INIT_INO`).
pub const CGROUP_NS_INIT_INO: u64 = 0xEFFF_FFFB;

/// What this process can see of the cgroup namespaces, read by [`Facts::read`].
#[derive(Clone, Debug)]
pub struct Facts {
    /// The inode of this process's cgroup namespace; None on a kernel without them (< 4.6).
    pub mine: Option<u64>,
    /// Whether this process is in the first PID namespace (the host's).
    pub host_pid_ns: bool,
    /// pid 1's cgroup namespace, or why it cannot be read.
    pub pid1: Result<u64, String>,
    /// The cgroup namespace of pid 2 when it is kthreadd.
    pub kthreadd: Option<u64>,
}

/// What to do about the cgroup namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// This process already sees the host's cgroup tree.
    InHost,
    /// Join the cgroup namespace of this process (`/proc/PID/ns/cgroup`).
    Join { pid: u32 },
}

/// What [`enter_host_namespace`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entered {
    AlreadyThere,
    /// Joined the cgroup namespace of this process (1, or 2 where pid 1's is unreadable).
    Joined {
        via_pid: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupNsError {
    #[error(
        "this process runs in a cgroup namespace and a PID namespace of its own (a container's), \
         so it cannot see the host's cgroup tree: run it in the host's PID namespace \
         (Kubernetes: `hostPID: true`; podman, docker: `--pid=host`), where it joins the host's \
         cgroup namespace, or in the host's cgroup namespace (`--cgroupns=host`)"
    )]
    NoHostPid,
    #[error(
        "this process runs in a cgroup namespace of its own and cannot find the host's ({why}): \
         run it in the host's cgroup namespace (podman, docker: `--cgroupns=host`), or \
         privileged in the host's PID namespace (Kubernetes: `privileged: true`, \
         `hostPID: true`)"
    )]
    CannotFind { why: String },
    #[error(
        "this process runs in a cgroup namespace of its own and cannot join the host's ({what}: \
         {source}): run it privileged (it needs CAP_SYS_ADMIN for this), or in the host's \
         cgroup namespace (podman, docker: `--cgroupns=host`)"
    )]
    Join {
        what: String,
        source: std::io::Error,
    },
}

fn ns_ino(pid: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/ns/cgroup");
    fs::metadata(&path)
        .map(|m| m.ino())
        .map_err(|e| format!("cannot read {path}: {e}"))
}

impl Facts {
    pub fn read() -> Self {
        let kthreadd = fs::read_to_string("/proc/2/comm")
            .is_ok_and(|c| c.trim() == "kthreadd")
            .then(|| ns_ino("2").ok())
            .flatten();
        Self {
            mine: ns_ino("self").ok(),
            host_pid_ns: crate::host::in_host_pid_namespace(),
            pid1: ns_ino("1"),
            kthreadd,
        }
    }
}

/// The decision, from the facts alone.
pub fn plan(f: &Facts) -> Result<Plan, CgroupNsError> {
    let Some(mine) = f.mine else {
        // A kernel with no cgroup namespaces: everyone sees the host's tree.
        return Ok(Plan::InHost);
    };
    if mine == CGROUP_NS_INIT_INO {
        return Ok(Plan::InHost);
    }
    // Outside the host's PID namespace, pid 1 is the container's own init (this daemon, or
    // the pod's pause or an init in the image): its namespace says nothing about the host's.
    if !f.host_pid_ns {
        return Err(CgroupNsError::NoHostPid);
    }
    match &f.pid1 {
        Ok(init) if *init == mine => Ok(Plan::InHost),
        Ok(_) => Ok(Plan::Join { pid: 1 }),
        Err(why) if f.kthreadd == Some(CGROUP_NS_INIT_INO) => {
            tracing::debug!("{why}; the first cgroup namespace is kthreadd's");
            Ok(Plan::Join { pid: 2 })
        }
        Err(why) => Err(CgroupNsError::CannotFind { why: why.clone() }),
    }
}

/// Makes this thread see the host's cgroup tree: does nothing when it already does, joins the
/// host's cgroup namespace when it can, and otherwise says what to change, in one sentence.
///
/// `setns` moves only the calling thread; threads it starts afterwards inherit the namespace.
/// Call it while the process has one thread, before anything reads a cgroup path.
pub fn enter_host_namespace() -> Result<Entered, CgroupNsError> {
    let facts = Facts::read();
    match plan(&facts)? {
        Plan::InHost => Ok(Entered::AlreadyThere),
        Plan::Join { pid } => {
            join(pid)?;
            Ok(Entered::Joined { via_pid: pid })
        }
    }
}

fn join(pid: u32) -> Result<(), CgroupNsError> {
    let path = format!("/proc/{pid}/ns/cgroup");
    let err = |what: &str, source| CgroupNsError::Join {
        what: format!("{what} {path}"),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| err("opening", e))?;
    let target = file.metadata().map_err(|e| err("reading", e))?.ino();
    // SAFETY: setns on a namespace file descriptor we hold open; it changes only this
    // thread's cgroup namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(err("setns on", std::io::Error::last_os_error()));
    }
    match ns_ino("thread-self") {
        Ok(now) if now == target => Ok(()),
        now => Err(err(
            "checking",
            std::io::Error::other(format!(
                "this thread's cgroup namespace is {now:?} after joining {target}"
            )),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        mine: u64,
        host_pid_ns: bool,
        pid1: Result<u64, &str>,
        kthreadd: Option<u64>,
    ) -> Facts {
        Facts {
            mine: Some(mine),
            host_pid_ns,
            pid1: pid1.map_err(str::to_owned),
            kthreadd,
        }
    }

    const PRIVATE: u64 = 4026532500;

    #[test]
    fn the_first_namespace_is_the_host_s_whatever_pid_1_says() {
        let init = CGROUP_NS_INIT_INO;
        assert_eq!(
            plan(&facts(init, true, Ok(init), Some(init))).unwrap(),
            Plan::InHost
        );
        // A sandbox whose pid 1 cannot be read, and a container with --cgroupns=host only.
        assert_eq!(
            plan(&facts(init, true, Err("EACCES"), None)).unwrap(),
            Plan::InHost
        );
        assert_eq!(
            plan(&facts(init, false, Ok(init), None)).unwrap(),
            Plan::InHost
        );
        let none = Facts {
            mine: None,
            ..facts(0, false, Err("no such file"), None)
        };
        assert_eq!(plan(&none).unwrap(), Plan::InHost);
    }

    #[test]
    fn a_private_namespace_in_the_host_pid_namespace_joins_pid_1_s() {
        let init = CGROUP_NS_INIT_INO;
        assert_eq!(
            plan(&facts(PRIVATE, true, Ok(init), Some(init))).unwrap(),
            Plan::Join { pid: 1 }
        );
        // A host whose init is itself in a namespace other than the first: pid 1's is the
        // host's, the one to join or to share.
        assert_eq!(
            plan(&facts(PRIVATE, true, Ok(PRIVATE + 1), Some(init))).unwrap(),
            Plan::Join { pid: 1 }
        );
        assert_eq!(
            plan(&facts(PRIVATE, true, Ok(PRIVATE), Some(init))).unwrap(),
            Plan::InHost
        );
    }

    #[test]
    fn an_unreadable_pid_1_is_replaced_by_kthreadd_in_the_first_namespace() {
        let init = CGROUP_NS_INIT_INO;
        assert_eq!(
            plan(&facts(PRIVATE, true, Err("EACCES"), Some(init))).unwrap(),
            Plan::Join { pid: 2 }
        );
        // No kthreadd, or one not in the first namespace: nothing to identify the host's by.
        for k in [None, Some(PRIVATE + 1)] {
            let e = plan(&facts(
                PRIVATE,
                true,
                Err("cannot read /proc/1/ns/cgroup"),
                k,
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("cannot read /proc/1/ns/cgroup"), "{e}");
            assert!(e.contains("--cgroupns=host"), "{e}");
        }
    }

    #[test]
    fn outside_the_host_pid_namespace_it_asks_for_host_pid_and_never_trusts_pid_1() {
        let init = CGROUP_NS_INIT_INO;
        // pid 1 is the container's own: this daemon, or an init in its namespace.
        for pid1 in [Ok(PRIVATE), Ok(init), Err("EACCES")] {
            let e = plan(&facts(PRIVATE, false, pid1, None)).unwrap_err();
            assert!(matches!(e, CgroupNsError::NoHostPid));
            let e = e.to_string();
            assert!(
                e.contains("hostPID: true") && e.contains("--pid=host"),
                "{e}"
            );
            assert_eq!(e.matches(". ").count(), 0, "one sentence: {e}");
        }
    }

    #[test]
    fn this_process_s_facts_lead_to_a_plan_or_a_reason() {
        // The unit tests run on the host, or in a container: either way a decision, and an
        // error is one that names what to do.
        match plan(&Facts::read()) {
            Ok(_) => {}
            Err(e) => assert!(e.to_string().contains("--cgroupns=host"), "{e}"),
        }
    }
}
