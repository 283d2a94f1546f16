//! The maps, and the steps every hook shares: placing a cgroup in its instance, finding an
//! instance's state, counting, reporting and stopping a task.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use spawnguard_common::{
    Condemned, Event, GlobalCounters, HostLimits, HostState, InstanceState, PathKey, PathNode,
    PendingTask, ProcessRecord, ReleasingTask, TypeCounters, TypeDir, TypeLevels, TypeLimits,
    TypeState, CAUSE_MIGRATION, EVENTS_BYTES, EVENT_ADMITTED, EVENT_AUDIT_DENIED, EVENT_BREAKER,
    EVENT_DENIED, EVENT_FAIL_OPEN, EVENT_WARN, MAX_CREATED, MAX_DOOMED, MAX_INSTANCES,
    MAX_PATH_NODES, MAX_PENDING, MAX_PROCESSES, MAX_RELEASING, MAX_TYPES, MAX_TYPE_LEVELS,
    MODE_ENFORCE, POLICY_SIDES, REASON_FORK_RATE, REASON_HOST_TASKS, REASON_MAX_AGE,
    REASON_MAX_INSTANCES, REASON_MAX_TASKS, REASON_MAX_THREADS, REASON_TYPE_TASKS, RELEASE_PROCESS,
    RELEASE_REFUSED, SETTLE_BUSY, SETTLE_DONE, SETTLE_GONE, SETTLE_LIVE, TASK_COMM_LEN,
};
use spawnguard_ebpf::{
    admit_through, breaker_abandon_probe, breaker_denial, breaker_gate, breaker_instance_ended,
    policy_index, release, release_tasks, start_reclaim, word_tasks, Admission, AtomicU64,
    BreakerPolicy, Budget, Counters, Gate, Refusal, Request, Transition, ADMITTED, BREAKER_OPEN,
    OPENING, RECLAIMING, WARN_HOST_TASKS, WARN_INSTANCE_TASKS, WARN_TYPE_TASKS,
};

use crate::kernel::{self, Cgroup, Task};

#[map]
pub static TYPE_DIRS: HashMap<u64, TypeDir> = HashMap::with_max_entries(MAX_TYPES, 0);
// The policy maps hold two sides (`POLICY_SIDES`): userspace writes a whole policy into the
// side not in force, then switches `POLICY_SIDE` with one write, so a program never reads a
// type's limits half from one policy and half from another (see `policy_side`).
#[map]
pub static TYPE_POLICY: Array<TypeLimits> = Array::with_max_entries(MAX_TYPES * POLICY_SIDES, 0);
/// Which side of the policy maps is in force (0 or 1).
#[map]
pub static POLICY_SIDE: Array<u32> = Array::with_max_entries(1, 0);
/// Describes what is pinned (layout version, backend) for a daemon that adopts it.
#[map]
pub static META: Array<spawnguard_common::Meta> = Array::with_max_entries(1, 0);
#[map]
pub static BREAKER_LIMITS: Array<spawnguard_common::BreakerLimits> =
    Array::with_max_entries(MAX_TYPES * POLICY_SIDES, 0);
#[map]
pub static BREAKER_STATE: Array<spawnguard_common::BreakerState> =
    Array::with_max_entries(MAX_TYPES, 0);
#[map]
pub static TYPE_STATE: Array<TypeState> = Array::with_max_entries(MAX_TYPES, 0);
#[map]
pub static HOST_LIMITS: Array<HostLimits> = Array::with_max_entries(POLICY_SIDES, 0);
#[map]
pub static HOST_STATE: Array<HostState> = Array::with_max_entries(1, 0);
#[map]
pub static TYPE_LEVELS: Array<TypeLevels> = Array::with_max_entries(POLICY_SIDES, 0);
// Counters are updated in place with atomics; without preallocation a removed entry is freed
// after an RCU grace period instead of being reused under a concurrent writer.
#[map]
pub static INSTANCES: HashMap<u64, InstanceState> =
    HashMap::with_max_entries(MAX_INSTANCES, BPF_F_NO_PREALLOC);
/// The type paths, for following them in the kernel: a directory created inside one that
/// stands at a path node, under the name of the next component, stands at the next node.
#[map]
pub static PATH_CHILDREN: HashMap<PathKey, PathNode> = HashMap::with_max_entries(MAX_PATH_NODES, 0);
/// The directories (by cgroup id) that stand at a path node now: the cgroup2 root, each
/// directory on the way to a type directory, and the type directories.
#[map]
pub static PATH_DIRS: HashMap<u64, PathNode> = HashMap::with_max_entries(MAX_PATH_NODES, 0);
/// When each instance directory was created (key: cgroup id), from its mkdir to its rmdir:
/// `max_age` counts from it, while the instance's entry in INSTANCES exists only while it
/// holds tasks (an empty directory costs no entry there).
#[map]
pub static CREATED: HashMap<u64, u64> = HashMap::with_max_entries(MAX_CREATED, BPF_F_NO_PREALLOC);
/// Tasks that exited and are not yet released (by `task_struct` address): a counted task keeps
/// its charge, and a refused child its place in `refused_unreaped`, until its parent reaps it
/// (and an RCU grace period later), as it keeps its PID; the pids controller counts the same.
#[map]
pub static RELEASING: HashMap<u64, ReleasingTask> =
    HashMap::with_max_entries(MAX_RELEASING, BPF_F_NO_PREALLOC);
#[map]
pub static PROCESSES: HashMap<u32, ProcessRecord> =
    HashMap::with_max_entries(MAX_PROCESSES, BPF_F_NO_PREALLOC);
/// Tasks that are not counted although their process is (key: pid, value `DOOM_*`): refused
/// tasks being stopped, and threads let through uncounted. Their exit must not be uncounted;
/// the kill-compat backend kills the refused ones at their next syscall exit.
#[map]
pub static DOOMED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DOOMED, 0);
/// Processes (by tgid) refused after they existed, for `sys_exit` to kill when any of their
/// threads returns from a system call (kill-compat, and lsm without the kfunc). Keyed by process,
/// not thread: a process moved into an instance over budget may have its main thread blocked
/// (in `pthread_join`, `pause`) while others run.
#[map]
pub static CONDEMNED: HashMap<u32, Condemned> = HashMap::with_max_entries(MAX_DOOMED, 0);
/// lsm backend: tasks admitted in `task_alloc`, by `task_struct` address, until the fork
/// tracepoint records them or `task_free` releases a fork that failed after `task_alloc`.
#[map]
pub static PENDING: HashMap<u64, PendingTask> = HashMap::with_max_entries(MAX_PENDING, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
pub static TYPE_COUNTERS: PerCpuArray<TypeCounters> = PerCpuArray::with_max_entries(MAX_TYPES, 0);
#[map]
pub static GLOBAL_COUNTERS: PerCpuArray<GlobalCounters> = PerCpuArray::with_max_entries(1, 0);

/// `v`, unknown to the verifier from here on. Each path through a decision ends with its own
/// constants (refused or not, which warnings); while the code after it tests them, the verifier
/// keeps every path apart and walks the rest once per path. As unknown scalars the paths merge:
/// the fork and migration programs verify in a tenth of the steps (and of the start-up time).
/// Copied by a helper, which the verifier cannot see through (arithmetic with an unknown value
/// did not hide enough; a per-CPU map slot could be overwritten while an lsm program is
/// preempted between writing and reading it). `None` if the copy failed, which reading our own
/// stack cannot.
#[inline(always)]
pub fn opaque(v: u64) -> Option<u64> {
    // SAFETY: copies 8 bytes from our own stack.
    unsafe { bpf_probe_read_kernel(&raw const v) }.ok()
}

/// The enforcement backend (`BACKEND_*`), written by the loader before load.
#[unsafe(no_mangle)]
static BACKEND: u32 = 0;

/// 1 when a task the programs must stop after it exists (every refused task with `kill`; with
/// `lsm` only a `CLONE_INTO_CGROUP` child or a migration) is killed with the kfunc, 0 when it is
/// doomed and killed at its next syscall exit by `sys_exit` (then attached). Set by the loader.
#[unsafe(no_mangle)]
static STOP_WITH_KFUNC: u32 = 0;

#[inline(always)]
pub fn backend() -> u32 {
    // SAFETY: a plain read of our own read-only global (volatile: the loader replaces it).
    unsafe { core::ptr::read_volatile(&raw const BACKEND) }
}

#[inline(always)]
pub fn stop_with_kfunc() -> bool {
    // SAFETY: as for `backend`.
    unsafe { core::ptr::read_volatile(&raw const STOP_WITH_KFUNC) != 0 }
}

const SIGKILL: i32 = 9;
const PIDTYPE_PID: u32 = 0;
const PIDTYPE_TGID: u32 = 1;

unsafe extern "C" {
    /// kfunc (kernel >= 6.13). The loader resolves its BTF id, or turns the call into `r0 = 0`
    /// on kernels without it (the kill backend is then never selected).
    fn bpf_send_signal_task(task: *mut c_void, sig: i32, pid_type: u32, value: u64) -> i32;
}

/// Where a cgroup sits: the instance it belongs to and the instance's type.
#[derive(Clone, Copy)]
pub struct Placement {
    pub instance: u64,
    pub type_idx: u32,
}

/// Finds the instance a cgroup belongs to: the child of a type directory that contains it. At
/// most `MAX_TYPE_LEVELS` ancestor lookups, no walk.
#[inline(always)]
pub fn place(cgrp: Cgroup) -> Result<Option<Placement>, i32> {
    let Some(levels) = TYPE_LEVELS.get(policy_side()) else {
        return Ok(None);
    };
    let count = levels.count;
    if count == 0 {
        return Ok(None);
    }
    let level = kernel::cgroup_level(cgrp)?;
    for i in 0..MAX_TYPE_LEVELS {
        if i as u32 >= count {
            break;
        }
        let type_level = levels.levels[i];
        if level <= type_level {
            continue;
        }
        let type_dir = kernel::cgroup_ancestor_id(cgrp, type_level)?;
        // SAFETY: TYPE_DIRS values are plain data copied out immediately.
        if let Some(dir) = unsafe { TYPE_DIRS.get(&type_dir) } {
            let type_idx = dir.type_idx;
            let instance = kernel::cgroup_ancestor_id(cgrp, type_level + 1)?;
            return Ok(Some(Placement { instance, type_idx }));
        }
    }
    Ok(None)
}

/// The state of an instance, created when a task first enters it (its age counts from its
/// directory's creation, kept in CREATED). `None` means the map is full.
///
/// Sets `p.type_idx` to the type the instance is counted in: its path's, unless it holds tasks
/// charged to another (a type moved away while its agents run, with another type placed at its
/// old path): those keep counting where they were charged until they end, so every charge and
/// its release meet in one slot. An entry that holds no task takes its path's type: it carries
/// no charge, and its old slot may belong to another type by now.
#[inline(always)]
pub fn instance(p: &mut Placement) -> Option<*mut InstanceState> {
    let state = match INSTANCES.get_ptr_mut(&p.instance) {
        Some(state) => state,
        None => {
            create_instance(p.instance, p.type_idx);
            INSTANCES.get_ptr_mut(&p.instance)?
        }
    };
    // SAFETY: live map value. Its type is written only while its word is 0 (no task, no
    // opening or reclaiming mark), and then only with its path's type, which every CPU
    // writes alike.
    unsafe {
        if (*state).type_idx != p.type_idx && core::ptr::read_volatile(&(*state).tasks) == 0 {
            (*state).type_idx = p.type_idx;
        }
        p.type_idx = (*state).type_idx;
    }
    Some(state)
}

/// Adds an instance's entry (losing the race to another CPU is fine: the caller's lookup finds
/// its entry). Not inlined: the 72-byte value lives in this small frame, not in the fork
/// program's, whose stack (with its subprograms') is held to 512 bytes.
///
/// Every field is written on its own (volatile): zeroing the value at once is a call to
/// `memset`, a subprogram whose frame kernels before 6.x add to the 512 bytes.
#[inline(never)]
fn create_instance(id: u64, type_idx: u32) {
    // SAFETY: a u64 map value copied out at once.
    let created_ns = unsafe { CREATED.get(&id) }.copied().unwrap_or_else(now);
    let mut fresh = core::mem::MaybeUninit::<InstanceState>::uninit();
    let v = fresh.as_mut_ptr();
    // SAFETY: each store writes one field of our own stack value; together they write every
    // byte of it (the struct has no padding), so the map update reads initialized memory.
    let fresh = unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*v).tasks, 0);
        put(&raw mut (*v).processes, 0);
        put(&raw mut (*v).threads, 0);
        put(&raw mut (*v).rate_tat_ns, 0);
        put(&raw mut (*v).created_ns, created_ns);
        put(&raw mut (*v).type_idx, type_idx);
        put(&raw mut (*v).flags, 0);
        put(&raw mut (*v).admitted_ns, 0);
        put(&raw mut (*v).releasing, 0);
        put(&raw mut (*v).refused_unreaped, 0);
        fresh.assume_init_ref()
    };
    let _ = INSTANCES.insert(&id, fresh, BPF_NOEXIST as u64);
}

/// Remembers when an instance directory was created. When CREATED is full the instance's age
/// counts from its first task instead: counted and reported, never a refusal.
#[inline(always)]
pub fn keep_created(id: u64, created_ns: u64, r: &Report) {
    match CREATED.insert(&id, &created_ns, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Already kept (the usual case when an entry is reclaimed).
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            if let Some(g) = global_counters() {
                g.created_full += 1;
            }
            emit(
                EVENT_FAIL_OPEN,
                spawnguard_common::FAIL_CREATED_FULL,
                r,
                0,
                0,
            );
        }
    }
}

const EEXIST: i32 = 17;

/// Keeps a counted task's charge until it is released: false when RELEASING is full (the
/// caller then releases it at once, as before the task is reaped).
#[inline(always)]
pub fn defer_release(task: Task, state: *mut InstanceState, r: &ReleasingTask) -> bool {
    let mut parked = park(task as u64, r.instance, r.type_idx, r.kind);
    if parked == -EEXIST {
        // This task's memory held a task that was freed without its charge given back (its
        // free hook missed it: a few in some thousands on a loaded host). That task is gone,
        // so its charge goes back now; overwriting it would lose it for good.
        release_reused(task as u64);
        parked = park(task as u64, r.instance, r.type_idx, r.kind);
    }
    if parked != 0 {
        return false;
    }
    // SAFETY: an aligned u64 of a live map value, only updated atomically.
    unsafe { AtomicU64::from_ptr(&raw mut (*state).releasing) }.fetch_add(1);
    true
}

/// Puts an exited task (or a refused child) in RELEASING, unless its address is there already;
/// returns 0 or the map's error (`-EEXIST`: see `defer_release`). Not inlined: its value lives
/// in this small frame, not in the fork program's, whose stack (with its subprograms') kernels
/// before 6.x hold to 512 bytes.
#[inline(never)]
fn park(task: u64, instance: u64, type_idx: u32, kind: u32) -> i32 {
    let t = task as Task;
    let v = ReleasingTask {
        instance,
        type_idx,
        kind,
        pid: kernel::task_ids(t).map_or(0, |(pid, _)| pid),
        _pad: 0,
        start_ns: kernel::task_start_ns(t),
    };
    match RELEASING.insert(&task, &v, BPF_NOEXIST as u64) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// Gives back the charge parked under a task address that a new task now has.
#[inline(never)]
fn release_reused(key: u64) {
    if release_parked(key, 0, 0) == SETTLE_DONE {
        if let Some(g) = global_counters() {
            g.released_late += 1;
        }
    }
}

/// Gives back what the parked task `key` (a task address) held: from the free hook when the
/// task is released, or from the daemon's sweep for a task it found gone with its charge still
/// parked. Whoever removes the entry gives it back, once; returns a `SETTLE_*` code. With
/// `start_ns` (not 0), only the charge of the task that started then: the sweep's, which a new
/// task's exit at the same address may have settled and replaced since the sweep read it.
#[inline(always)]
pub fn release_parked(key: u64, pid: u32, start_ns: u64) -> u32 {
    // SAFETY: plain data copied out at once.
    let Some(r) = (unsafe { RELEASING.get(&key) }).copied() else {
        return SETTLE_GONE;
    };
    if start_ns != 0 && r.start_ns != start_ns {
        return SETTLE_GONE;
    }
    if RELEASING.remove(&key).is_err() {
        // Another CPU took it (or the map's lock failed: the sweep gives it back later).
        return SETTLE_BUSY;
    }
    let Some(state) = INSTANCES.get_ptr_mut(&r.instance) else {
        // Its instance's entry went with a count that drifted (settled at rmdir).
        if r.kind != RELEASE_REFUSED {
            if let Some(g) = global_counters() {
                g.drift += 1;
            }
        }
        return SETTLE_DONE;
    };
    if r.kind == RELEASE_REFUSED {
        // SAFETY: an aligned u64 of a live map value, only updated atomically.
        take_one(unsafe { AtomicU64::from_ptr(&raw mut (*state).refused_unreaped) });
        return SETTLE_DONE;
    }
    // SAFETY: as above.
    take_one(unsafe { AtomicU64::from_ptr(&raw mut (*state).releasing) });
    let (threads, processes) = if r.kind == RELEASE_PROCESS {
        (0, 1)
    } else {
        (1, 0)
    };
    release_counted(
        state, r.type_idx, r.instance, pid, threads, processes, false,
    );
    SETTLE_DONE
}

/// Takes one from a counter that must not go below zero (a count that drifted stays at 0).
#[inline(always)]
pub fn take_one(counter: &AtomicU64) {
    if counter.fetch_sub(1) == 0 {
        counter.fetch_add(1);
    }
}

/// Whether every task counted in an instance has exited (the rest wait to be reaped): the
/// instance has ended, for the breaker, although it holds its slot until they are released.
#[inline(always)]
pub fn all_exited(state: *mut InstanceState) -> bool {
    // SAFETY: aligned u64s of a live map value, only updated atomically; two reads that may
    // race with another exit, which then sees the same (the breaker is told at most twice).
    unsafe {
        let word = AtomicU64::from_ptr(&raw mut (*state).tasks).load();
        let releasing = AtomicU64::from_ptr(&raw mut (*state).releasing).load();
        word_tasks(word) != 0 && word_tasks(word) <= releasing
    }
}

/// Gives back what a counted task held (`threads`/`processes`: what it was, 1/0 or 0/1); the
/// last task out of an instance gives its entry back, and, with `ends`, ends it for the breaker
/// (`ends` is false for a release after the exit: the breaker heard at the exit).
#[inline(always)]
pub fn release_counted(
    state: *mut InstanceState,
    type_idx: u32,
    instance: u64,
    target_pid: u32,
    threads: u64,
    processes: u64,
    ends: bool,
) {
    let Some(c) = counters(state, type_idx) else {
        return;
    };
    let left = release_tasks(&c, 1, threads, processes);
    if left.drift {
        if let Some(g) = global_counters() {
            g.drift += 1;
        }
    }
    if left.closed {
        let r = Report {
            cause: spawnguard_common::CAUSE_EXIT,
            type_idx,
            instance,
            target_pid,
        };
        if ends {
            instance_ended(state, &r);
        }
        reclaim(state, &c, &r);
    }
}

/// A child refused after it existed (killed) holds a PID until its parent reaps it, as it does
/// under the pids controller. Counts it as unreaped in its instance (unless its parent reaps
/// children as they exit), for `status`. (Stopping a spawner that leaves too many unreaped was
/// tried: the count lags the reap by an RCU grace period, which under a fork storm grew past any
/// fixed margin and killed spawners that did reap.)
#[inline(always)]
pub fn hold_refused(child: Task, state: *mut InstanceState, r: &Report) {
    // SAFETY: the helper returns the current task (the spawner), valid for this program run.
    let spawner = unsafe { bpf_get_current_task() } as Task;
    if kernel::reaps_children_at_exit(spawner) {
        return;
    }
    // (Where the child's address still holds a charge its free hook missed, that charge stays
    // and this refusal goes unreported: the child's own release gives that charge back.)
    if park(
        child as u64,
        r.instance,
        r.type_idx,
        spawnguard_common::RELEASE_REFUSED,
    ) != 0
    {
        return;
    }
    // SAFETY: an aligned u64 of a live map value, only updated atomically.
    unsafe { AtomicU64::from_ptr(&raw mut (*state).refused_unreaped) }.fetch_add(1);
}

/// Drops the entry of an instance whose last task was released, so that directories of ended
/// agents never fill INSTANCES. Its creation time stays
/// in CREATED until its rmdir (none is kept when the rmdir came first); its fork-rate bucket goes with it (an empty instance cannot fork).
/// Returns whether this caller removed it.
#[inline(always)]
pub fn reclaim(state: *mut InstanceState, c: &Counters<'_>, r: &Report) -> bool {
    if !start_reclaim(c) {
        return false;
    }
    // SAFETY: live map value, plain reads.
    let (created_ns, flags) = unsafe { ((*state).created_ns, (*state).flags) };
    // A directory already removed keeps no creation time (its rmdir dropped it).
    if flags & spawnguard_common::INSTANCE_REMOVED == 0 {
        keep_created(r.instance, created_ns, r);
    }
    let _ = INSTANCES.remove(&r.instance);
    if let Some(g) = global_counters() {
        g.reclaimed += 1;
    }
    true
}

/// Settles an instance entry that holds no task and waits for none (the daemon's sweep, see
/// `settle.rs`): closes it if it still holds a `max_instances` slot, then gives the entry back.
/// Returns a `SETTLE_*` code.
#[inline(always)]
pub fn settle(id: u64) -> u32 {
    let Some(state) = INSTANCES.get_ptr_mut(&id) else {
        return SETTLE_GONE;
    };
    // SAFETY: live map value, plain read.
    let type_idx = unsafe { (*state).type_idx };
    let Some(c) = counters(state, type_idx) else {
        return SETTLE_GONE;
    };
    // SAFETY: an aligned u64 of a live map value, only updated atomically.
    let releasing = unsafe { AtomicU64::from_ptr(&raw mut (*state).releasing) }.load();
    let word = c.instance.load();
    if word_tasks(word) != 0 || releasing != 0 || word & (OPENING | RECLAIMING) != 0 {
        return SETTLE_LIVE;
    }
    if word & ADMITTED != 0 {
        // The close its last task missed. A task entering meanwhile makes this fail: then the
        // instance is live again, and its own last task closes it.
        if c.instance.compare_exchange(ADMITTED, 0).is_err() {
            return SETTLE_BUSY;
        }
        release(c.type_instances, 1);
    }
    let r = Report {
        cause: spawnguard_common::CAUSE_EXIT,
        type_idx,
        instance: id,
        target_pid: 0,
    };
    if !reclaim(state, &c, &r) {
        return SETTLE_BUSY;
    }
    if let Some(g) = global_counters() {
        g.settled += 1;
    }
    SETTLE_DONE
}

/// Removes the record of a gone process (the daemon saw no such pid at two sweeps in a row) if
/// it still counts no live task. A new process with that pid has a record with a live task
/// (the fork hook drops the old one first), which stays.
pub fn settle_process(tgid: u32) -> u32 {
    let Some(rec) = PROCESSES.get_ptr_mut(&tgid) else {
        return SETTLE_GONE;
    };
    if process_live(rec).load() != 0 {
        return SETTLE_LIVE;
    }
    let _ = PROCESSES.remove(&tgid);
    SETTLE_DONE
}

/// The counters a task in this instance is checked against: the instance's, its type's and
/// the host's. `None` only for an out-of-range type index.
#[inline(always)]
pub fn counters<'a>(state: *mut InstanceState, type_idx: u32) -> Option<Counters<'a>> {
    let type_state = TYPE_STATE.get_ptr_mut(type_idx)?;
    let host = HOST_STATE.get_ptr_mut(0)?;
    // SAFETY: the pointers are map values that stay valid for this program run (maps are
    // RCU-protected); the fields are naturally aligned u64 only ever updated atomically.
    unsafe {
        Some(Counters {
            instance: AtomicU64::from_ptr(&raw mut (*state).tasks),
            processes: AtomicU64::from_ptr(&raw mut (*state).processes),
            threads: AtomicU64::from_ptr(&raw mut (*state).threads),
            rate_tat: AtomicU64::from_ptr(&raw mut (*state).rate_tat_ns),
            type_instances: AtomicU64::from_ptr(&raw mut (*type_state).instances),
            type_tasks: AtomicU64::from_ptr(&raw mut (*type_state).tasks),
            host_tasks: AtomicU64::from_ptr(&raw mut (*host).tasks),
        })
    }
}

#[inline(always)]
pub fn process_live<'a>(record: *mut ProcessRecord) -> &'a AtomicU64 {
    // SAFETY: as for `counters`.
    unsafe { AtomicU64::from_ptr(&raw mut (*record).live) }
}

/// The side of the policy maps in force. A policy is written whole into the other side before
/// the switch, and that side is written again only after every program that may still read it
/// has finished (the daemon waits out an RCU grace period after each switch).
#[inline(always)]
pub fn policy_side() -> u32 {
    POLICY_SIDE.get(0).map_or(0, |side| *side & 1)
}

/// A type's limits in the policy in force (`None` past the last slot).
#[inline(always)]
pub fn type_policy(type_idx: u32) -> Option<&'static TypeLimits> {
    if type_idx >= MAX_TYPES {
        return None;
    }
    TYPE_POLICY.get(policy_index(policy_side(), type_idx))
}

/// The limits of a type (and the host), or `None` when the slot is empty (the type was removed
/// by a policy change): such tasks are not enforced.
#[inline(always)]
pub fn budget(type_idx: u32) -> Option<Budget> {
    let t = type_policy(type_idx)?;
    if t.active == 0 {
        return None;
    }
    let host = HOST_LIMITS.get(policy_side())?;
    Some(Budget::of(t, host))
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn type_counters(type_idx: u32) -> Option<&'static mut TypeCounters> {
    // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
    TYPE_COUNTERS
        .get_ptr_mut(type_idx)
        .map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn global_counters() -> Option<&'static mut GlobalCounters> {
    // SAFETY: per-CPU slot, as above.
    GLOBAL_COUNTERS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Describes a decision for the event stream.
pub struct Report {
    pub cause: u32,
    pub type_idx: u32,
    pub instance: u64,
    pub target_pid: u32,
}

#[inline(always)]
fn reason_code(r: Refusal) -> u32 {
    match r {
        Refusal::MaxTasks => REASON_MAX_TASKS,
        Refusal::MaxThreads => REASON_MAX_THREADS,
        Refusal::ForkRate => REASON_FORK_RATE,
        Refusal::MaxInstances => REASON_MAX_INSTANCES,
        Refusal::TypeTasks => REASON_TYPE_TASKS,
        Refusal::HostTasks => REASON_HOST_TASKS,
        Refusal::MaxAge => REASON_MAX_AGE,
        Refusal::BreakerOpen => spawnguard_common::REASON_BREAKER_OPEN,
    }
}

/// Usage and limit of the budget behind `reason`, for events. A host warning names the
/// configured host budget; a host denial the threshold (`deny_at`) that refused.
#[inline(always)]
fn usage(reason: u32, c: &Counters<'_>, b: &Budget, warning: bool) -> (u64, u64) {
    match reason {
        REASON_HOST_TASKS if warning => (
            c.host_tasks.load(),
            HOST_LIMITS
                .get(policy_side())
                .map_or(b.max_host_tasks, |h| h.max_tasks),
        ),
        REASON_MAX_TASKS => (word_tasks(c.instance.load()), b.max_tasks),
        REASON_MAX_THREADS => (c.threads.load(), b.max_threads),
        REASON_MAX_INSTANCES => (c.type_instances.load(), b.max_instances),
        REASON_TYPE_TASKS => (c.type_tasks.load(), b.max_type_tasks),
        REASON_HOST_TASKS => (c.host_tasks.load(), b.max_host_tasks),
        REASON_MAX_AGE => (0, 0),
        spawnguard_common::REASON_BREAKER_OPEN => (0, 0),
        _ => (0, 0),
    }
}

/// Counts a decision and sends an event for every refusal (enforced or audited), every
/// warning threshold crossed and every fail-open.
#[inline(always)]
pub fn record(adm: &Admission, b: &Budget, c: &Counters<'_>, r: &Report) {
    if adm.rate_contended {
        if let Some(g) = global_counters() {
            g.rate_contended += 1;
        }
    }
    if adm.contended {
        fail_open(spawnguard_common::FAIL_CONTENDED, r);
    }
    if adm.opened {
        if let Some(tc) = type_counters(r.type_idx) {
            tc.instances_admitted += 1;
        }
        emit(
            EVENT_ADMITTED,
            0,
            r,
            c.type_instances.load(),
            b.max_instances,
        );
    }
    if adm.warnings != 0 {
        for (bit, reason) in [
            (WARN_INSTANCE_TASKS, REASON_MAX_TASKS),
            (WARN_TYPE_TASKS, REASON_TYPE_TASKS),
            (WARN_HOST_TASKS, REASON_HOST_TASKS),
        ] {
            if adm.warnings & bit != 0 {
                if let Some(tc) = type_counters(r.type_idx) {
                    tc.warnings += 1;
                }
                let (used, limit) = usage(reason, c, b, true);
                emit(EVENT_WARN, reason, r, used, limit);
            }
        }
    }
    let Some(refusal) = adm.refusal else {
        return;
    };
    let reason = reason_code(refusal);
    if let Some(tc) = type_counters(r.type_idx) {
        let per_reason = if adm.counted {
            &mut tc.audit_denied
        } else {
            &mut tc.denied
        };
        // Constant offsets: LLVM may bounds-check one copy of a variable index and address
        // with another, which the verifier rejects.
        match refusal {
            Refusal::MaxTasks => per_reason[0] += 1,
            Refusal::MaxThreads => per_reason[1] += 1,
            Refusal::ForkRate => per_reason[2] += 1,
            Refusal::MaxInstances => per_reason[3] += 1,
            Refusal::TypeTasks => per_reason[4] += 1,
            Refusal::HostTasks => per_reason[5] += 1,
            Refusal::MaxAge => per_reason[6] += 1,
            Refusal::BreakerOpen => per_reason[7] += 1,
        }
        if r.cause == CAUSE_MIGRATION && !adm.counted {
            tc.migrations_denied += 1;
        }
    }
    if !adm.counted && refusal != Refusal::BreakerOpen {
        denial_for_breaker(r);
    }
    let (used, limit) = usage(reason, c, b, false);
    let kind = if adm.counted {
        EVENT_AUDIT_DENIED
    } else {
        EVENT_DENIED
    };
    emit(kind, reason, r, used, limit);
}

/// The breaker of a type: its policy and its shared state.
struct TypeBreaker<'a> {
    policy: &'a BreakerPolicy,
    word: &'a AtomicU64,
    probe: *mut u64,
    ring: &'a [AtomicU64; spawnguard_common::FAILURE_RING],
    next: &'a AtomicU64,
    storm_start: &'a AtomicU64,
    storm_count: &'a AtomicU64,
    state: *mut spawnguard_common::BreakerState,
}

#[inline(always)]
fn type_breaker<'a>(type_idx: u32) -> Option<TypeBreaker<'a>> {
    if type_idx >= MAX_TYPES {
        return None;
    }
    let policy = BREAKER_LIMITS.get(policy_index(policy_side(), type_idx))?;
    if policy.enabled == 0 {
        return None;
    }
    let s = BREAKER_STATE.get_ptr_mut(type_idx)?;
    // SAFETY: a live array map value; the u64 fields are aligned and only updated atomically
    // (the ring is an array of u64 with the layout of [AtomicU64; N]).
    unsafe {
        Some(TypeBreaker {
            policy,
            word: AtomicU64::from_ptr(&raw mut (*s).word),
            probe: &raw mut (*s).probe_instance,
            ring: &*(&raw const (*s).failures)
                .cast::<[AtomicU64; spawnguard_common::FAILURE_RING]>(),
            next: AtomicU64::from_ptr(&raw mut (*s).failure_next),
            storm_start: AtomicU64::from_ptr(&raw mut (*s).storm_start_ms),
            storm_count: AtomicU64::from_ptr(&raw mut (*s).storm_count),
            state: s,
        })
    }
}

/// Reports a breaker transition and remembers it in the breaker's state.
#[inline(always)]
fn transition(br: &TypeBreaker<'_>, t: Transition, r: &Report, now_ms: u64) {
    // SAFETY: plain counters in a live map value; a lost update under a race only blurs them.
    unsafe {
        if t.to == BREAKER_OPEN {
            (*br.state).trips += 1;
        }
        if let Some(tc) = type_counters(r.type_idx) {
            if let Some(n) = tc.breaker_entered.get_mut(t.to as usize) {
                *n += 1;
            }
        }
        (*br.state).last_cause = t.cause as u64;
        (*br.state).last_change_ms = now_ms;
    }
    emit(
        EVENT_BREAKER,
        t.cause as u32,
        r,
        (t.from << 8) | t.to,
        t.until_ms,
    );
}

/// Counts tasks into an instance, then, when this opened a new instance, asks the type's
/// breaker: refused while open, and in half-open exactly one new instance (the probe) passes.
#[inline(always)]
pub fn admit_task(
    c: &Counters<'_>,
    b: &Budget,
    request: &Request,
    state: *mut InstanceState,
    r: &Report,
) -> Admission {
    // Undecidable if the decision cannot be passed on (it always can): fail open.
    let mut adm = opaque(admit_through(c, b, request, opaque).to_word())
        .map_or(Admission::contended(), Admission::from_word);
    if !(adm.counted && adm.opened) {
        return adm;
    }
    // SAFETY: plain store into a live map value (read only by the exit hook of this instance).
    unsafe { (*state).admitted_ns = request.now };
    let Some(br) = type_breaker(r.type_idx) else {
        return adm;
    };
    let now_ms = request.now / 1_000_000;
    let (gate, t) = breaker_gate(br.word, now_ms, br.policy);
    if let Some(t) = t {
        transition(&br, t, r, now_ms);
    }
    match gate {
        Gate::Pass => {}
        // SAFETY: plain store into a live map value; only the probe's winner writes it.
        Gate::Probe => unsafe { *br.probe = r.instance },
        Gate::Refused { .. } if b.enforce => {
            release_tasks(c, request.tasks, request.threads, request.processes);
            return Admission::refused(Refusal::BreakerOpen);
        }
        Gate::Refused { .. } => {
            adm.refusal = adm.refusal.or(Some(Refusal::BreakerOpen));
        }
    }
    adm
}

/// A new process in an instance (`r` names it): refused while the instance is past a
/// condemning max age, else counted in like any task.
#[inline(always)]
pub fn admit_process(
    c: &Counters<'_>,
    b: &Budget,
    state: *mut InstanceState,
    r: &Report,
) -> Admission {
    if past_max_age(state, r.type_idx, r) {
        return Admission::refused(Refusal::MaxAge);
    }
    admit_task(c, b, &Request::fork(now()), state, r)
}

/// A new thread in an instance (`r` names it). No max-age refusal for threads: with the kill
/// backends a refused thread takes its whole process with it, which would turn
/// `on_max_age = "freeze"` into a kill.
#[inline(always)]
pub fn admit_thread(
    c: &Counters<'_>,
    b: &Budget,
    state: *mut InstanceState,
    r: &Report,
) -> Admission {
    admit_task(c, b, &Request::thread(now()), state, r)
}

/// Fail open for a thread that could not be decided (contended, or its refusal could not be
/// recorded): counted after all, with no refusal; uncounted only if even that loses the race.
#[inline(always)]
pub fn admit_thread_anyway(
    c: &Counters<'_>,
    b: &Budget,
    state: *mut InstanceState,
    r: &Report,
) -> Admission {
    let audit = Budget {
        enforce: false,
        ..*b
    };
    let mut adm = admit_thread(c, &audit, state, r);
    adm.refusal = None;
    adm
}

/// Tells the breaker that an instance ended (its last task left). A start-up failure counts
/// toward opening it; the probe's end decides the half-open state.
#[inline(always)]
pub fn instance_ended(state: *mut InstanceState, r: &Report) {
    let Some(br) = type_breaker(r.type_idx) else {
        return;
    };
    let now = now();
    // SAFETY: plain reads of live map values.
    let (admitted, probe) = unsafe { ((*state).admitted_ns, *br.probe) };
    let lived_ms = now.saturating_sub(admitted) / 1_000_000;
    let now_ms = now / 1_000_000;
    if let Some(t) = breaker_instance_ended(
        br.word,
        br.ring,
        br.next,
        now_ms,
        lived_ms,
        probe == r.instance,
        br.policy,
    ) {
        transition(&br, t, r, now_ms);
    }
}

/// An enforced denial in a type, for its deny-storm trigger.
#[inline(always)]
fn denial_for_breaker(r: &Report) {
    let Some(br) = type_breaker(r.type_idx) else {
        return;
    };
    let now_ms = now() / 1_000_000;
    if let Some(t) = breaker_denial(br.word, br.storm_start, br.storm_count, now_ms, br.policy) {
        transition(&br, t, r, now_ms);
    }
}

/// A probe counted and then dropped (its process could not be recorded): let the next
/// instance probe.
#[inline(always)]
pub fn abandon_probe(r: &Report) {
    let Some(br) = type_breaker(r.type_idx) else {
        return;
    };
    // SAFETY: plain read of a live map value.
    if unsafe { *br.probe } != r.instance {
        return;
    }
    let now_ms = now() / 1_000_000;
    if let Some(t) = breaker_abandon_probe(br.word, now_ms) {
        transition(&br, t, r, now_ms);
    }
}

/// The kernel's lazy max-age check, on every new task of an instance: the first time the
/// instance is seen past its type's `max_age`, an event says so (the daemon freezes or kills it
/// on its timer). Returns whether the new task must be refused: when `on_max_age` condemns the
/// instance (freeze or kill) and the type is enforced, it may not grow meanwhile.
#[inline(always)]
pub fn past_max_age(state: *mut InstanceState, type_idx: u32, r: &Report) -> bool {
    let Some(t) = type_policy(type_idx) else {
        return false;
    };
    if t.max_age_ns == spawnguard_common::NO_LIMIT {
        return false;
    }
    // SAFETY: live map value, plain read.
    let created = unsafe { (*state).created_ns };
    let now = now();
    if !spawnguard_ebpf::past_max_age(created, now, t.max_age_ns) {
        return false;
    }
    // SAFETY: `flags` is a u32 in a live map value; a racing CPU may report too (harmless).
    let flags = unsafe { &mut (*state).flags };
    if *flags & spawnguard_common::INSTANCE_AGED == 0 {
        *flags |= spawnguard_common::INSTANCE_AGED;
        emit(
            spawnguard_common::EVENT_MAX_AGE,
            REASON_MAX_AGE,
            r,
            (now - created) / 1_000_000_000,
            t.max_age_ns / 1_000_000_000,
        );
    }
    t.on_max_age != spawnguard_common::ON_MAX_AGE_EVENT && t.mode == MODE_ENFORCE
}

/// Reports a task let through uncounted because the kernel side could not account for it.
#[inline(always)]
pub fn fail_open(reason: u32, r: &Report) {
    count_failure(reason);
    emit(EVENT_FAIL_OPEN, reason, r, 0, 0);
}

/// Reports a task that needed an entry of a full map (`reason`: `FAIL_PROCESSES_FULL`,
/// `FAIL_DOOMED_FULL`): refused (`closed`), in an instance already counted, since letting it
/// through would lift that instance's budget and agents together can fill a map (DESIGN: no
/// fail-open an agent can provoke); or let through uncounted. Counted with that map's
/// fail-opens either way. One event call for both (each call site of `emit` is verified
/// again, and 5.10's verifier walks each many times).
#[inline(always)]
pub fn map_full(reason: u32, closed: bool, r: &Report) {
    count_failure(reason);
    let kind = if closed {
        spawnguard_common::EVENT_FAIL_CLOSED
    } else {
        EVENT_FAIL_OPEN
    };
    emit(kind, reason, r, 0, 0);
}

#[inline(always)]
fn count_failure(reason: u32) {
    if let Some(g) = global_counters() {
        match reason {
            spawnguard_common::FAIL_INSTANCES_FULL => g.instances_full += 1,
            spawnguard_common::FAIL_PROCESSES_FULL => g.processes_full += 1,
            spawnguard_common::FAIL_DOOMED_FULL => g.doomed_full += 1,
            spawnguard_common::FAIL_CONTENDED => g.contended += 1,
            spawnguard_common::FAIL_KILL => g.kill_failed += 1,
            _ => g.read_errors += 1,
        }
    }
}

/// Not inlined: one copy of the ring-buffer write as a BPF subprogram, not one per call site
/// (code size and verification time). Its frame must stay small: the
/// verifier limits the stack of a program and its subprograms together to 512 bytes, so every
/// field is written straight into the reserved ring-buffer record, with no `Event` on the
/// stack (kernel 6.1 refused a 272-byte frame here).
#[inline(never)]
fn emit(kind: u32, reason: u32, r: &Report, usage: u64, limit: u64) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        if let Some(g) = global_counters() {
            g.events_dropped += 1;
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    let id = bpf_get_current_pid_tgid();
    // SAFETY: `ev` points to a reserved record of `size_of::<Event>()` bytes that only this
    // program writes until it is submitted; every field is written (no kernel memory leaks
    // out); the helpers write at most 16 bytes into the 16-byte name fields.
    unsafe {
        (*ev).ts_ns = now();
        (*ev).instance = r.instance;
        (*ev).usage = usage;
        (*ev).limit = limit;
        (*ev).kind = kind;
        (*ev).reason = reason;
        (*ev).cause = r.cause;
        (*ev).type_idx = r.type_idx;
        (*ev).pid = id as u32;
        (*ev).tgid = (id >> 32) as u32;
        (*ev).target_pid = r.target_pid;
        (*ev).backend = backend();
        let comm = (&raw mut (*ev).comm).cast::<c_void>();
        if generated::bpf_get_current_comm(comm, TASK_COMM_LEN as u32) != 0 {
            crate::kernel::zero_comm((&raw mut (*ev).comm).cast::<u8>());
        }
        crate::kernel::parent_comm_into(
            bpf_get_current_task() as *const u8,
            (&raw mut (*ev).parent_comm).cast::<u8>(),
        );
    }
    entry.submit(0);
}

/// DOOMED values: the task was refused (and is being stopped: by the kfunc, or through CONDEMNED),
/// or it was let through uncounted (fail open); either way its exit must not be uncounted.
pub const DOOM_KILL: u32 = 1;
pub const DOOM_UNCOUNTED: u32 = 2;

/// Marks a denied task so its exit is not uncounted, and, without the kfunc, condemns its
/// process so it is killed when any of its threads next returns from a system call. Fails when
/// a map is full.
#[inline(always)]
pub fn doom(task: Task, pid: u32, tgid: u32, instance: u64) -> bool {
    if DOOMED.insert(&pid, &DOOM_KILL, BPF_ANY as u64).is_err() {
        return false;
    }
    stop_with_kfunc() || condemn(task, tgid, instance)
}

/// Condemns the process of `task` (`tgid`; refused into `instance`) for `sys_exit` to kill. False
/// when the map is full. Not inlined, like `park`.
#[inline(never)]
pub fn condemn(task: Task, tgid: u32, instance: u64) -> bool {
    let c = Condemned {
        instance,
        since_ns: now(),
        start_ns: kernel::task_start_ns(task),
    };
    CONDEMNED.insert(&tgid, &c, BPF_ANY as u64).is_ok()
}

/// Marks a task that runs uncounted so its exit is not uncounted either.
#[inline(always)]
pub fn mark_uncounted(pid: u32) -> bool {
    DOOMED.insert(&pid, &DOOM_UNCOUNTED, BPF_ANY as u64).is_ok()
}

/// Stops a new task that was refused after it was created. A new thread cannot die alone
/// (SIGKILL takes its whole thread group), so with the kill backends a refused thread ends its
/// process; the lsm backend fails the clone in `task_alloc` instead and gets here only for what
/// `task_alloc` could not decide. Without the kfunc the caller has doomed the task and
/// `sys_exit` kills it before it returns to user code.
/// Returns false when the kernel refused the signal (the task then runs, uncounted).
#[inline(always)]
pub fn stop_new_task(task: Task) -> bool {
    if stop_with_kfunc() {
        // SAFETY: `task` is the tracepoint's own trusted task pointer, passed unchanged.
        return unsafe { bpf_send_signal_task(task as *mut c_void, SIGKILL, PIDTYPE_PID, 0) } == 0;
    }
    true
}

/// Stops a whole process that migrated into an instance over its budget (without the kfunc:
/// doomed by the caller, killed at its next syscall exit).
/// Returns false when the kernel refused the signal (the process then runs, uncounted).
#[inline(always)]
pub fn stop_process(task: Task) -> bool {
    if stop_with_kfunc() {
        // SAFETY: `task` is the tracepoint's own trusted task pointer, passed unchanged.
        return unsafe { bpf_send_signal_task(task as *mut c_void, SIGKILL, PIDTYPE_TGID, 0) } == 0;
    }
    true
}

/// Whether a refused task must be in DOOMED before it is stopped: threads always (their exit
/// must not be uncounted), processes when `sys_exit` does the killing.
#[inline(always)]
pub fn needs_doom(thread: bool) -> bool {
    thread || !stop_with_kfunc()
}

/// Readies a refused process for `stop_new_task`/`stop_process`, even with DOOMED full: without
/// the kfunc `sys_exit` kills it, so it is marked and condemned, or condemned alone (a process
/// needs no DOOMED mark: it has no record, so its exit gives back nothing). False when even
/// CONDEMNED is full: it then runs, uncounted.
#[inline(always)]
pub fn condemn_refused_process(task: Task, pid: u32, tgid: u32, instance: u64) -> bool {
    !needs_doom(false) || doom(task, pid, tgid, instance) || condemn(task, tgid, instance)
}

/// Gives back what `task_alloc` charged for a task that will never run. Returns whether that
/// closed its instance (it held no other task).
#[inline(always)]
pub fn release_pending(p: &PendingTask) -> bool {
    if p.flags & spawnguard_common::PENDING_COUNTED == 0 {
        return false;
    }
    let Some(state) = INSTANCES.get_ptr_mut(&p.instance) else {
        return false;
    };
    let Some(c) = counters(state, p.type_idx) else {
        return false;
    };
    let thread = p.flags & spawnguard_common::PENDING_THREAD != 0;
    let (threads, processes) = if thread { (1, 0) } else { (0, 1) };
    let left = release_tasks(&c, 1, threads, processes);
    if left.closed {
        // The instance it opened never started: not a start-up failure, but no longer the
        // breaker's probe either.
        let r = Report {
            cause: spawnguard_common::CAUSE_FORK,
            type_idx: p.type_idx,
            instance: p.instance,
            target_pid: 0,
        };
        abandon_probe(&r);
    }
    left.closed
}
