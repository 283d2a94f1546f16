//! Types shared by the eBPF programs and the `spawnguard` binary: map keys and values, events,
//! the codes in them (with the names userspace prints), kernel offsets. Layout only: the
//! decision logic lives in `spawnguard-ebpf`'s library.
#![no_std]

/// Most agent types a policy may define (size of the per-type arrays).
pub const MAX_TYPES: u32 = 64;
/// The policy maps (type and breaker limits, host limits, type levels) hold two policies: the
/// one in force (`POLICY_SIDE`) and the next one, written whole before the switch.
pub const POLICY_SIDES: u32 = 2;
/// Most distinct cgroup levels that type directories may sit at. Each fork looks at each level
/// once, so this bounds the per-fork cost.
pub const MAX_TYPE_LEVELS: usize = 4;
/// Bytes kept of a type's name in the kernel (names are validated against this).
pub const TYPE_NAME_LEN: usize = 32;
pub const TASK_COMM_LEN: usize = 16;

/// Map names, shared so the loader and `status` never disagree with the programs.
pub mod maps {
    pub const TYPE_DIRS: &str = "TYPE_DIRS";
    pub const TYPE_POLICY: &str = "TYPE_POLICY";
    pub const TYPE_LEVELS: &str = "TYPE_LEVELS";
    pub const INSTANCES: &str = "INSTANCES";
    pub const PROCESSES: &str = "PROCESSES";
    pub const DOOMED: &str = "DOOMED";
    pub const EVENTS: &str = "EVENTS";
    pub const TYPE_COUNTERS: &str = "TYPE_COUNTERS";
    pub const GLOBAL_COUNTERS: &str = "GLOBAL_COUNTERS";
    pub const TYPE_STATE: &str = "TYPE_STATE";
    pub const HOST_LIMITS: &str = "HOST_LIMITS";
    pub const HOST_STATE: &str = "HOST_STATE";
    pub const META: &str = "META";
    pub const BREAKER_LIMITS: &str = "BREAKER_LIMITS";
    pub const BREAKER_STATE: &str = "BREAKER_STATE";
    pub const PENDING: &str = "PENDING";
    pub const PATH_CHILDREN: &str = "PATH_CHILDREN";
    pub const PATH_DIRS: &str = "PATH_DIRS";
    pub const CREATED: &str = "CREATED";
    pub const RELEASING: &str = "RELEASING";
    pub const CONDEMNED: &str = "CONDEMNED";
    pub const POLICY_SIDE: &str = "POLICY_SIDE";
    pub const ALL: [&str; 22] = [
        META,
        BREAKER_LIMITS,
        BREAKER_STATE,
        TYPE_DIRS,
        TYPE_POLICY,
        TYPE_LEVELS,
        INSTANCES,
        PROCESSES,
        DOOMED,
        EVENTS,
        TYPE_COUNTERS,
        GLOBAL_COUNTERS,
        TYPE_STATE,
        HOST_LIMITS,
        HOST_STATE,
        PENDING,
        PATH_CHILDREN,
        PATH_DIRS,
        CREATED,
        RELEASING,
        CONDEMNED,
        POLICY_SIDE,
    ];
}

/// Version of the layout of every map shared with a running (pinned) enforcer. A daemon adopts
/// pinned state only of its own layout version; bump it whenever a map's key or value type, or
/// a map's meaning, changes (the size snapshot test below catches most changes).
pub const LAYOUT_VERSION: u32 = 4;

/// Element 0 of `META`: what is pinned, for the daemon that adopts it. Not read by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub layout_version: u32,
    pub backend: u32,
    /// `bpf_ktime_get_ns` time (CLOCK_MONOTONIC) of the install.
    pub installed_ns: u64,
}

/// Backoff steps a breaker keeps (the last one repeats).
pub const BREAKER_STEPS: usize = 16;
/// Start-up failure timestamps a breaker keeps, so `failures` is at most this.
pub const FAILURE_RING: usize = 16;

/// The circuit-breaker policy of one type, in milliseconds; element `type_idx` of
/// `BREAKER_LIMITS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerLimits {
    pub enabled: u32,
    pub _pad: u32,
    pub startup_window_ms: u64,
    pub failures: u64,
    pub within_ms: u64,
    pub open_for_ms: [u64; BREAKER_STEPS],
    pub steps: u64,
    pub storm_denials: u64,
    pub storm_within_ms: u64,
}

/// The shared breaker of one type; element `type_idx` of `BREAKER_STATE`. Survives daemon
/// restarts with the pinned maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerState {
    /// state (2 bits) | backoff step (6 bits) | deadline in ms (56 bits).
    pub word: u64,
    /// The half-open probe instance (cgroup id), while probing.
    pub probe_instance: u64,
    pub failure_next: u64,
    pub failures: [u64; FAILURE_RING],
    pub storm_start_ms: u64,
    pub storm_count: u64,
    /// Times it opened.
    pub trips: u64,
    /// Cause (spawnguard-ebpf's breaker `Cause`) and time (ms) of the last transition.
    pub last_cause: u64,
    pub last_change_ms: u64,
}

/// Default map capacities (the loader may override them).
/// Instances holding tasks at once (an empty instance directory holds no entry).
pub const MAX_INSTANCES: u32 = 16_384;
/// Instance directories whose creation time is kept (empty ones included), for `max_age`.
pub const MAX_CREATED: u32 = 65_536;
/// Nodes of the type paths (each directory on the way to a type directory, and the type
/// directories themselves), and directories standing at them.
pub const MAX_PATH_NODES: u32 = 1_024;
/// Bytes of a path component the kernel compares, its NUL included: policy components are at
/// most `PATH_NAME_LEN - 2` bytes, so a name the kernel reads whole is never a truncated one.
pub const PATH_NAME_LEN: usize = 64;
/// `PathNode::type_idx` of a directory on the way to a type directory.
pub const NO_TYPE: u32 = u32::MAX;
pub const MAX_PROCESSES: u32 = 65_536;
pub const MAX_DOOMED: u32 = 8_192;
/// Tasks that exited and are not yet released (zombies not reaped, and an RCU grace period
/// after that): they hold their charge, as they hold their PID, until then.
pub const MAX_RELEASING: u32 = 65_536;
/// Tasks between `task_alloc` and the fork tracepoint at once (lsm backend).
pub const MAX_PENDING: u32 = 4_096;
pub const EVENTS_BYTES: u32 = 256 * 1024;

pub const MODE_AUDIT: u32 = 0;
pub const MODE_ENFORCE: u32 = 1;

/// One enum per code the kernel side writes into a map or an event: the code (its
/// discriminant), its name as userspace prints it (`name`), and the way back from a `u32` read
/// from a map (`from_u32`; map fields stay `u32`, as a pinned map of another layout could hold
/// any value). `ALL` lists the codes in order.
macro_rules! codes {
    (
        $(#[$meta:meta])*
        pub enum $enum:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal => $name:literal,)+
        }
    ) => {
        codes! {
            $(#[$meta])*
            pub enum $enum as u32 {
                $($(#[$vmeta])* $variant = $code => $name,)+
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub enum $enum:ident as $repr:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal => $name:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $enum {
            $($(#[$vmeta])* $variant = $code,)+
        }

        impl $enum {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }

            pub const fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($code => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// How a denied task is stopped: killed before it runs (kfunc), killed at its first syscall
    /// exit, or never created (`lsm/task_alloc` fails the fork with EAGAIN). `Meta::backend` and
    /// `Event::backend`.
    #[cfg_attr(
        feature = "user",
        derive(serde::Serialize, serde::Deserialize),
        serde(rename_all = "kebab-case")
    )]
    pub enum Backend {
        Kill = 1 => "kill",
        KillCompat = 2 => "kill-compat",
        Lsm = 3 => "lsm",
    }
}

impl core::fmt::Display for Backend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

pub const BACKEND_KILL: u32 = Backend::Kill as u32;
pub const BACKEND_KILL_COMPAT: u32 = Backend::KillCompat as u32;
pub const BACKEND_LSM: u32 = Backend::Lsm as u32;

/// Struct member offsets of the running kernel, read from its BTF by the loader and written into
/// the programs' read-only globals before load. Never hard-coded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_cgroups: u32,
    pub task_signal: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_level: u32,
    pub cgroup_kn: u32,
    /// `cgroup.ancestors[]` (pointers, kernel >= 5.19) or `cgroup.ancestor_ids[]` (u64 ids).
    pub cgroup_ancestors: u32,
    /// 1 when `cgroup_ancestors` points at `ancestor_ids[]` (ids, not pointers).
    pub ancestors_are_ids: u32,
    pub kernfs_node_id: u32,
    /// `signal_struct.live`: threads of the process not yet exiting.
    pub signal_live: u32,
    pub task_flags: u32,
    /// `cgroup.root`: which hierarchy a cgroup belongs to (v1 hierarchies are ignored).
    pub cgroup_root: u32,
    /// `task_struct.real_parent` and `task_struct.comm`: the parent's name in events.
    pub task_real_parent: u32,
    pub task_comm: u32,
    /// `kernfs_node.name`: a cgroup directory's name, to follow type paths.
    pub kernfs_name: u32,
    /// `task_struct.sighand`, `sighand_struct.action[]`, the size of a `k_sigaction` and its
    /// handler and flags: whether a spawner's children are reaped as they exit (SIGCHLD
    /// ignored, or `SA_NOCLDWAIT`).
    pub task_sighand: u32,
    pub sighand_action: u32,
    pub k_sigaction_size: u32,
    pub k_sigaction_handler: u32,
    pub k_sigaction_flags: u32,
    /// `task_struct.start_boottime` (ns since boot, as /proc/PID/stat shows it): tells a
    /// condemned process from a later one
    /// with its pid.
    pub task_start_boottime: u32,
}

/// Value of `TYPE_DIRS` (key: cgroup id of a type's directory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeDir {
    pub type_idx: u32,
    pub level: u32,
}

/// Key of `PATH_CHILDREN`: a directory named `name` (NUL-padded) inside a directory that stands
/// at path node `parent` (node 0 is the cgroup2 root).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathKey {
    pub parent: u32,
    pub _pad: u32,
    pub name: [u8; PATH_NAME_LEN],
}

/// Value of `PATH_CHILDREN` and, by id, what a directory stands for: the path node it is, and
/// the type it is the directory of (`NO_TYPE` on the way to one). The kernel follows type paths
/// with it at every `cgroup_mkdir`, so a recreated type directory is that type from its first
/// instant. Value of `PATH_DIRS` (key: cgroup id) too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathNode {
    pub node: u32,
    pub type_idx: u32,
    pub level: u32,
    pub _pad: u32,
}

/// Distinct levels of the type directories; element 0 of `TYPE_LEVELS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeLevels {
    pub count: u32,
    pub levels: [u32; MAX_TYPE_LEVELS],
}

/// The limits of one type (per instance and for the whole type); element `type_idx` of
/// `TYPE_POLICY`. `NO_LIMIT` disables a limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeLimits {
    pub max_tasks: u64,
    pub max_threads: u64,
    /// Nanoseconds per fork-rate token; 0 disables the rate limit.
    pub rate_interval_ns: u64,
    pub rate_burst: u64,
    /// `rate_interval_ns * rate_burst`, precomputed (BPF has no 128-bit multiply).
    pub rate_window_ns: u64,
    pub max_instances: u64,
    pub max_total_tasks: u64,
    /// Usage at which a warning fires (`warn_at` of the matching limit).
    pub warn_tasks: u64,
    pub warn_total_tasks: u64,
    pub warn_instances: u64,
    /// Instances older than this (since creation) are past their age; `NO_LIMIT`: none.
    pub max_age_ns: u64,
    /// `ON_MAX_AGE_*`.
    pub on_max_age: u32,
    /// Changes (mod 256) whenever the fork rate or burst changes: instances' buckets of an
    /// older generation start full.
    pub rate_gen: u32,
    /// `MODE_*`; an exempt type is loaded as audit.
    pub mode: u32,
    /// 1 when this slot holds a type.
    pub active: u32,
    /// NUL-padded type name, so pinned state describes itself.
    pub name: [u8; TYPE_NAME_LEN],
}

pub const NO_LIMIT: u64 = u64::MAX;

/// A limit as userspace shows it: `None` for `NO_LIMIT`.
pub const fn limit(v: u64) -> Option<u64> {
    if v == NO_LIMIT {
        None
    } else {
        Some(v)
    }
}

pub const ON_MAX_AGE_EVENT: u32 = 0;
pub const ON_MAX_AGE_FREEZE: u32 = 1;
pub const ON_MAX_AGE_KILL: u32 = 2;

impl Default for TypeLimits {
    fn default() -> Self {
        Self {
            max_tasks: NO_LIMIT,
            max_threads: NO_LIMIT,
            rate_interval_ns: 0,
            rate_burst: 0,
            rate_window_ns: 0,
            max_instances: NO_LIMIT,
            max_total_tasks: NO_LIMIT,
            warn_tasks: NO_LIMIT,
            warn_total_tasks: NO_LIMIT,
            warn_instances: NO_LIMIT,
            max_age_ns: NO_LIMIT,
            on_max_age: ON_MAX_AGE_EVENT,
            rate_gen: 0,
            mode: MODE_AUDIT,
            active: 0,
            name: [0; TYPE_NAME_LEN],
        }
    }
}

/// Live usage of one type across its instances; element `type_idx` of `TYPE_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeState {
    /// Admitted instances (the ones holding a `max_instances` slot).
    pub instances: u64,
    pub tasks: u64,
}

/// The host budget; element 0 of `HOST_LIMITS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    /// `[host] max_tasks`, for reporting.
    pub max_tasks: u64,
    /// Tasks above which new tasks are denied (`max_tasks * deny_at`).
    pub deny_tasks: u64,
    pub warn_tasks: u64,
}

impl Default for HostLimits {
    fn default() -> Self {
        Self {
            max_tasks: NO_LIMIT,
            deny_tasks: NO_LIMIT,
            warn_tasks: NO_LIMIT,
        }
    }
}

/// Live tasks in all instances of all types; element 0 of `HOST_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    pub tasks: u64,
}

/// Value of `INSTANCES` (key: cgroup id of the instance). Counters are updated with atomics in
/// place by every CPU; the map is allocated without preallocation so entries are RCU-freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceState {
    /// Live tasks (processes + threads) in the low 62 bits; the top bit says the instance is
    /// admitted (holds one of its type's `max_instances` slots), the next one that its entry is
    /// being reclaimed (its last task left). One word, so they change together.
    pub tasks: u64,
    pub processes: u64,
    /// Live tasks that are not counted as their process (tasks - processes).
    pub threads: u64,
    /// GCRA theoretical arrival time of the fork-rate limiter, in `bpf_ktime_get_ns` time (low
    /// 56 bits), and the type's rate generation it was taken under (top 8 bits): a bucket of
    /// another generation starts full, so a rate change applies at once.
    pub rate_tat_ns: u64,
    pub created_ns: u64,
    pub type_idx: u32,
    /// `INSTANCE_*` bits.
    pub flags: u32,
    /// When the instance last got its first task (admission), for the breaker's start-up
    /// window.
    pub admitted_ns: u64,
    /// Tasks counted in `tasks` that exited and wait to be released (reaped, then freed).
    pub releasing: u64,
    /// Refused children (killed) not yet reaped by their parent: they hold PIDs too.
    pub refused_unreaped: u64,
}

/// The kernel has reported this instance past its max age (once).
pub const INSTANCE_AGED: u32 = 1;
/// Its directory was removed while exited tasks still held the entry: the last release reclaims
/// the entry without keeping a creation time for a directory that is gone.
pub const INSTANCE_REMOVED: u32 = 2;

/// Value of `PROCESSES` (key: tgid): which instance a counted process is counted in, and how many
/// of its tasks are live. A process without a record is not counted anywhere.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessRecord {
    pub instance: u64,
    pub live: u64,
}

/// Value of `RELEASING` (key: `task_struct` address): a task that exited, and what its release
/// gives back. Keyed by task, not pid: a pid is free for reuse before the task is released.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleasingTask {
    pub instance: u64,
    pub type_idx: u32,
    /// `RELEASE_*`.
    pub kind: u32,
    /// The task's id and start (`start_boottime`, ns since boot): the daemon's sweep gives
    /// back the charge of a task that is gone (reaped) while its entry is still here, which the
    /// free hook should have done (see the userspace `settle.rs`).
    pub pid: u32,
    pub _pad: u32,
    pub start_ns: u64,
}

/// Value of `CONDEMNED` (key: tgid): a process refused after it existed (moved into an
/// instance over budget, or a refused child or thread) that the `sys_exit` hook kills when any
/// of its threads returns from a system call. The daemon kills those whose threads make none
/// (through a pidfd, after checking `start_ns` against the process it opened).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Condemned {
    pub instance: u64,
    /// `bpf_ktime_get_ns` when it was condemned.
    pub since_ns: u64,
    /// The process's `task_struct.start_boottime` (its leader's, ns since boot).
    pub start_ns: u64,
}

/// A counted thread (not its process's last task).
pub const RELEASE_THREAD: u32 = 1;
/// A counted process's last task.
pub const RELEASE_PROCESS: u32 = 2;
/// A refused child that was killed: counted in `refused_unreaped` until reaped.
pub const RELEASE_REFUSED: u32 = 3;

/// A task the `lsm` backend admitted in `task_alloc`, keyed by its `task_struct` address until
/// the fork tracepoint records it (or `task_free` releases it when the fork failed later on).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingTask {
    pub instance: u64,
    pub type_idx: u32,
    /// `PENDING_*` bits.
    pub flags: u32,
}

/// The task was counted in `instance` (a thread: in its process's instance); without this bit
/// it was let through uncounted (fail open) and its exit must not be uncounted either.
pub const PENDING_COUNTED: u32 = 1;
/// The task is a thread of an existing process.
pub const PENDING_THREAD: u32 = 2;

codes! {
    /// The budget that refused a task or that a warning is about (`Event::reason` of denials
    /// and warnings), and the index of its counters in `TypeCounters::denied`. Named as the
    /// policy names the budget.
    pub enum Reason {
        MaxTasks = 0 => "max_tasks",
        MaxThreads = 1 => "max_threads",
        ForkRate = 2 => "fork_rate",
        MaxInstances = 3 => "max_instances",
        TypeTasks = 4 => "max_total_tasks",
        HostTasks = 5 => "host_max_tasks",
        /// The instance is past its `max_age` and its type's `on_max_age` freezes or kills it:
        /// it may not grow meanwhile.
        MaxAge = 6 => "max_age",
        /// The type's circuit breaker is open (or half-open with its probe running).
        BreakerOpen = 7 => "breaker_open",
    }
}

pub const REASON_MAX_TASKS: u32 = Reason::MaxTasks as u32;
pub const REASON_MAX_THREADS: u32 = Reason::MaxThreads as u32;
pub const REASON_FORK_RATE: u32 = Reason::ForkRate as u32;
pub const REASON_MAX_INSTANCES: u32 = Reason::MaxInstances as u32;
pub const REASON_TYPE_TASKS: u32 = Reason::TypeTasks as u32;
pub const REASON_HOST_TASKS: u32 = Reason::HostTasks as u32;
pub const REASON_MAX_AGE: u32 = Reason::MaxAge as u32;
pub const REASON_BREAKER_OPEN: u32 = Reason::BreakerOpen as u32;
pub const REASONS: usize = Reason::ALL.len();

codes! {
    /// The state of a type's breaker: the top two bits of its `BreakerState::word` (the
    /// `BREAKER_*` values of spawnguard-ebpf) and the index of `TypeCounters::breaker_entered`.
    /// (Not named `BreakerState`: that is the map value holding the word.)
    pub enum BreakerPhase {
        Closed = 0 => "closed",
        /// Refusing new instances until the deadline.
        Open = 1 => "open",
        /// A probe instance may start, or runs (`BREAKER_PROBING`).
        HalfOpen = 2 => "half-open",
    }
}

pub const BREAKER_STATES: usize = BreakerPhase::ALL.len();

codes! {
    /// Why a breaker changed state: `BreakerState::last_cause`, and `Event::reason` of breaker
    /// events. (spawnguard-ebpf's breaker calls it `Cause`.)
    // One byte, as the eBPF breaker has always held it in `Transition`: a wider field moves
    // the programs' code (and their verifier steps) for nothing.
    pub enum BreakerCause as u8 {
        /// `failures` start-up failures within `within`.
        Failures = 1 => "start-up failures",
        /// The open time ended and a new instance was let through as the probe.
        ProbeAdmitted = 2 => "open time over: probe admitted",
        /// The probe outlived its start-up window.
        ProbeHealthy = 3 => "probe healthy",
        /// The probe ended within its start-up window.
        ProbeFailed = 4 => "probe failed",
        DenyStorm = 5 => "deny storm",
        /// Opened, closed or fed by `spawnguard breaker` (userspace).
        Manual = 6 => "manual",
        /// A probe admitted but then refused by another budget: it never ran.
        ProbeAbandoned = 7 => "probe never ran",
    }
}

/// Per-CPU counters per type; element `type_idx` of `TYPE_COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeCounters {
    pub forks_allowed: u64,
    pub threads_allowed: u64,
    pub denied: [u64; REASONS],
    pub audit_denied: [u64; REASONS],
    pub migrations_in: u64,
    pub migrations_denied: u64,
    /// Warning thresholds crossed (`warn_at`).
    pub warnings: u64,
    /// Instances admitted (took a `max_instances` slot).
    pub instances_admitted: u64,
    /// Breaker transitions, by the state entered (closed, open, half-open).
    pub breaker_entered: [u64; BREAKER_STATES],
}

/// Per-CPU counters for the whole host; element 0 of `GLOBAL_COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    pub events_dropped: u64,
    /// Fail-open cases: the task was let through uncounted. `processes_full` and `doomed_full`
    /// also count the tasks refused because those maps were full (`EVENT_FAIL_CLOSED`).
    pub instances_full: u64,
    pub processes_full: u64,
    pub doomed_full: u64,
    pub read_errors: u64,
    pub rate_contended: u64,
    /// Instance counts found below zero on exit (drift; clamped, never wrapped).
    pub drift: u64,
    pub contended: u64,
    pub kill_failed: u64,
    /// Instance directories whose creation time could not be kept (`CREATED` full): their age
    /// counts from their first task.
    pub created_full: u64,
    /// Instance entries reclaimed when their last task left.
    pub reclaimed: u64,
    /// Exited tasks released at once because RELEASING was full (their PIDs may still be held).
    pub releasing_full: u64,
    /// Empty instance entries the daemon's sweep gave back (`SETTLE_DONE`): a close whose lock
    /// was missed (emulated atomics), a first task refused, processes moved out.
    pub settled: u64,
    /// Charges of exited tasks the free hook never gave back, given back later: by the daemon's
    /// sweep (the task gone), or by the exit of a new task at the same address.
    pub released_late: u64,
}

/// What the `settle` program is asked to do (its first argument; the second is the key).
pub const SETTLE_INSTANCE: u64 = 0;
/// Give back what a parked task (`RELEASING`, by task address) held: the task is gone.
pub const SETTLE_RELEASE: u64 = 1;
/// Remove the record of a process (`PROCESSES`, by tgid) that is gone, if it still counts no
/// live task (`SETTLE_LIVE` otherwise): one the free hook never removed.
pub const SETTLE_PROCESS: u64 = 2;

/// What the `settle` program did with an instance entry (its return value).
pub const SETTLE_DONE: u32 = 0;
/// The instance holds tasks, or tasks wait to be released: nothing to settle.
pub const SETTLE_LIVE: u32 = 1;
/// No such entry.
pub const SETTLE_GONE: u32 = 2;
/// Another CPU held the word (or its emulated lock): try again later.
pub const SETTLE_BUSY: u32 = 3;

codes! {
    /// What an `Event` reports (`Event::kind`).
    pub enum EventKind {
        Denied = 1 => "denied",
        AuditDenied = 2 => "audit_denied",
        FailOpen = 3 => "fail_open",
        /// A warning threshold was crossed; `reason` names the budget (`Reason`).
        Warn = 4 => "warn",
        /// An instance was first seen past its max age (usage and limit in seconds).
        MaxAge = 5 => "max_age",
        /// A breaker changed state: `reason` is the cause (`BreakerCause`), `usage`
        /// is `from << 8 | to` (`BreakerPhase`), `limit` the new deadline in ms (next retry
        /// when opened).
        Breaker = 6 => "breaker",
        /// A new instance was admitted (its first task counted; it holds a `max_instances`
        /// slot). `usage`/`limit` are the type's admitted instances and its ceiling.
        Admitted = 7 => "admitted",
        /// A task refused because a map it needed was full (`reason`: the `FailOpen` code,
        /// `processes_full` or `doomed_full`), in an instance already counted: its budget holds.
        FailClosed = 8 => "fail_closed",
    }
}

pub const EVENT_DENIED: u32 = EventKind::Denied as u32;
pub const EVENT_AUDIT_DENIED: u32 = EventKind::AuditDenied as u32;
pub const EVENT_FAIL_OPEN: u32 = EventKind::FailOpen as u32;
pub const EVENT_WARN: u32 = EventKind::Warn as u32;
pub const EVENT_MAX_AGE: u32 = EventKind::MaxAge as u32;
pub const EVENT_BREAKER: u32 = EventKind::Breaker as u32;
pub const EVENT_ADMITTED: u32 = EventKind::Admitted as u32;
pub const EVENT_FAIL_CLOSED: u32 = EventKind::FailClosed as u32;

codes! {
    /// What the kernel saw when it made an event (`Event::cause`).
    pub enum Cause {
        /// A new process.
        Fork = 1 => "fork",
        Thread = 2 => "thread",
        /// A process moved into an instance.
        Migration = 3 => "migration",
        /// A task exit (breaker transitions caused by an instance ending).
        Exit = 4 => "exit",
    }
}

pub const CAUSE_FORK: u32 = Cause::Fork as u32;
pub const CAUSE_THREAD: u32 = Cause::Thread as u32;
pub const CAUSE_MIGRATION: u32 = Cause::Migration as u32;
pub const CAUSE_EXIT: u32 = Cause::Exit as u32;

codes! {
    /// Why a task was let through uncounted (`Event::reason` of fail-open events).
    pub enum FailOpen {
        InstancesFull = 1 => "instances_full",
        ProcessesFull = 2 => "processes_full",
        DoomedFull = 3 => "doomed_full",
        ReadError = 4 => "read_error",
        /// Other CPUs kept changing the instance's counters (bounded compare-and-swap gave up).
        Contended = 5 => "contended",
        /// The kernel refused to signal a refused task (it runs, uncounted).
        KillFailed = 6 => "kill_failed",
        /// Not a task let through: an instance directory's creation time could not be kept
        /// (`CREATED` is full), so its `max_age` counts from its first task.
        CreatedFull = 7 => "created_full",
    }
}

pub const FAIL_INSTANCES_FULL: u32 = FailOpen::InstancesFull as u32;
pub const FAIL_PROCESSES_FULL: u32 = FailOpen::ProcessesFull as u32;
pub const FAIL_DOOMED_FULL: u32 = FailOpen::DoomedFull as u32;
pub const FAIL_READ_ERROR: u32 = FailOpen::ReadError as u32;
pub const FAIL_CONTENDED: u32 = FailOpen::Contended as u32;
pub const FAIL_KILL: u32 = FailOpen::KillFailed as u32;
pub const FAIL_CREATED_FULL: u32 = FailOpen::CreatedFull as u32;

/// One record of the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub instance: u64,
    pub usage: u64,
    pub limit: u64,
    pub kind: u32,
    /// `REASON_*` for denials and warnings, `FAIL_*` for fail-open events.
    pub reason: u32,
    pub cause: u32,
    pub type_idx: u32,
    /// The task that asked (the forking parent, or the migrated process).
    pub pid: u32,
    pub tgid: u32,
    /// The task that was stopped (the new child, or the migrated process).
    pub target_pid: u32,
    pub backend: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// The asking task's parent's name (who launched the spawner).
    pub parent_comm: [u8; TASK_COMM_LEN],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], Copy, integers only, no padding.
    unsafe impl aya::Pod for Meta {}
    // SAFETY: #[repr(C)], Copy, integers only, explicit padding.
    unsafe impl aya::Pod for BreakerLimits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BreakerState {}
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, with explicit padding.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TypeDir {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TypeLevels {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TypeLimits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TypeState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HostLimits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HostState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InstanceState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProcessRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PendingTask {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TypeCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GlobalCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PathKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PathNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReleasingTask {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Condemned {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code in `constants` has a name, no other code in 0..=64 has one, and names are
    /// unique: whatever the kernel side emits, userspace prints it by name.
    fn named_exactly<T: Copy + PartialEq + core::fmt::Debug>(
        constants: &[u32],
        from_u32: fn(u32) -> Option<T>,
        name: fn(T) -> &'static str,
        all: &[T],
    ) {
        for v in 0..=64 {
            assert_eq!(
                from_u32(v).is_some(),
                constants.contains(&v),
                "code {v}: named if and only if it is a constant"
            );
        }
        assert_eq!(all.len(), constants.len());
        for (i, &c) in constants.iter().enumerate() {
            let code = from_u32(c).unwrap();
            assert_eq!(code, all[i], "ALL is in code order");
            assert!(!name(code).is_empty());
            for &other in &constants[i + 1..] {
                assert_ne!(
                    name(code),
                    name(from_u32(other).unwrap()),
                    "names are unique"
                );
            }
        }
    }

    #[test]
    fn every_kernel_code_has_one_name_and_round_trips() {
        let reasons = [
            REASON_MAX_TASKS,
            REASON_MAX_THREADS,
            REASON_FORK_RATE,
            REASON_MAX_INSTANCES,
            REASON_TYPE_TASKS,
            REASON_HOST_TASKS,
            REASON_MAX_AGE,
            REASON_BREAKER_OPEN,
        ];
        named_exactly(&reasons, Reason::from_u32, Reason::name, Reason::ALL);
        // Reasons index the per-reason counters.
        assert_eq!(reasons, core::array::from_fn(|i| i as u32));
        assert_eq!(REASONS, reasons.len());
        for r in reasons {
            assert_eq!(Reason::from_u32(r).unwrap() as u32, r);
        }

        let kinds = [
            EVENT_DENIED,
            EVENT_AUDIT_DENIED,
            EVENT_FAIL_OPEN,
            EVENT_WARN,
            EVENT_MAX_AGE,
            EVENT_BREAKER,
            EVENT_ADMITTED,
            EVENT_FAIL_CLOSED,
        ];
        named_exactly(&kinds, EventKind::from_u32, EventKind::name, EventKind::ALL);
        for k in kinds {
            assert_eq!(EventKind::from_u32(k).unwrap() as u32, k);
        }

        let breaker_causes: [u32; 7] = core::array::from_fn(|i| i as u32 + 1);
        named_exactly(
            &breaker_causes,
            BreakerCause::from_u32,
            BreakerCause::name,
            BreakerCause::ALL,
        );

        let causes = [CAUSE_FORK, CAUSE_THREAD, CAUSE_MIGRATION, CAUSE_EXIT];
        named_exactly(&causes, Cause::from_u32, Cause::name, Cause::ALL);
        for c in causes {
            assert_eq!(Cause::from_u32(c).unwrap() as u32, c);
        }

        let fails = [
            FAIL_INSTANCES_FULL,
            FAIL_PROCESSES_FULL,
            FAIL_DOOMED_FULL,
            FAIL_READ_ERROR,
            FAIL_CONTENDED,
            FAIL_KILL,
            FAIL_CREATED_FULL,
        ];
        named_exactly(&fails, FailOpen::from_u32, FailOpen::name, FailOpen::ALL);
        for f in fails {
            assert_eq!(FailOpen::from_u32(f).unwrap() as u32, f);
        }

        let backends = [BACKEND_KILL, BACKEND_KILL_COMPAT, BACKEND_LSM];
        named_exactly(&backends, Backend::from_u32, Backend::name, Backend::ALL);
        for b in backends {
            assert_eq!(Backend::from_u32(b).unwrap() as u32, b);
        }

        // Breaker states index `breaker_entered`.
        let phases: [u32; BREAKER_STATES] = core::array::from_fn(|i| i as u32);
        named_exactly(
            &phases,
            BreakerPhase::from_u32,
            BreakerPhase::name,
            BreakerPhase::ALL,
        );
    }

    #[test]
    fn codes_are_named_as_userspace_prints_them() {
        let names: [&str; REASONS] = core::array::from_fn(|i| Reason::ALL[i].name());
        assert_eq!(
            names,
            [
                "max_tasks",
                "max_threads",
                "fork_rate",
                "max_instances",
                "max_total_tasks",
                "host_max_tasks",
                "max_age",
                "breaker_open"
            ]
        );
        assert_eq!(BreakerPhase::HalfOpen.name(), "half-open");
        assert_eq!(Backend::KillCompat.name(), "kill-compat");
        assert_eq!(FailOpen::KillFailed.name(), "kill_failed");
        assert_eq!(EventKind::AuditDenied.name(), "audit_denied");
        assert_eq!(Cause::Migration.name(), "migration");
    }

    /// A change here changes what a pinned enforcer holds: bump `LAYOUT_VERSION` with it.
    #[test]
    fn map_layouts_are_those_of_layout_version_4() {
        assert_eq!(LAYOUT_VERSION, 4);
        let sizes = [
            size_of::<KernelOffsets>(),
            size_of::<TypeDir>(),
            size_of::<TypeLevels>(),
            size_of::<TypeLimits>(),
            size_of::<TypeState>(),
            size_of::<HostLimits>(),
            size_of::<HostState>(),
            size_of::<InstanceState>(),
            size_of::<ProcessRecord>(),
            size_of::<TypeCounters>(),
            size_of::<GlobalCounters>(),
            size_of::<Event>(),
            size_of::<Meta>(),
            size_of::<BreakerLimits>(),
            size_of::<BreakerState>(),
            size_of::<PendingTask>(),
            size_of::<PathKey>(),
            size_of::<PathNode>(),
            size_of::<ReleasingTask>(),
            size_of::<Condemned>(),
        ];
        assert_eq!(
            sizes,
            [88, 8, 20, 136, 16, 24, 8, 72, 16, 200, 112, 96, 16, 184, 192, 16, 72, 16, 32, 24]
        );
    }
}
