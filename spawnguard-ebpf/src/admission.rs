//! Budget and admission: whether a new task (or a process moving in) may enter an instance,
//! counted in the instance, its type and the host, and what leaving gives back.

use spawnguard_common::{HostLimits, TypeLimits, MODE_ENFORCE};

use crate::{refund_token, take_token, AtomicU64, Token, CAS_ATTEMPTS};

/// Reserve-then-check: adds `n` to `counter` and keeps it only if the result is within `limit`
/// (or `keep_over` is set, as in audit mode). Returns whether the budget held.
///
/// The add happens before the check, so two CPUs racing for the last slot see different previous
/// values and at most one of them wins: zero overshoot without a lock.
#[inline(always)]
pub fn reserve(counter: &AtomicU64, n: u64, limit: u64, keep_over: bool) -> bool {
    let previous = counter.fetch_add(n);
    let within = previous.saturating_add(n) <= limit;
    if !within && !keep_over {
        counter.fetch_sub(n);
    }
    within
}

/// Adds `n` to a total that every instance of a type (or the host) shares, if it stays within
/// `limit` (always with `keep`, audit mode). Returns the total before, and whether `n` was
/// added. Checked first, then compared-and-swapped: a task refused here never holds, even for
/// an instant, a unit another instance's task could have had (`reserve` would). A task that
/// keeps losing the compare-and-swap reserves after all; so does the `emulated-atomics` build,
/// where a compare-and-swap takes the one lock: both are conservative, never an overshoot.
#[inline(always)]
pub fn take_total(total: &AtomicU64, n: u64, limit: u64, keep: bool) -> (u64, bool) {
    #[cfg(not(all(target_arch = "bpf", feature = "emulated-atomics")))]
    if !keep && limit < 1 << 62 {
        let mut current = total.load();
        for _ in 0..CAS_ATTEMPTS {
            // 1 when `n` fits, computed without a branch (each costs the verifier a path per
            // try: the totals fit far below 2^62, so the difference's sign bit says it). A
            // task that does not fit swaps the total with itself, which settles what it read.
            let fits = 1 - (limit.wrapping_sub(current.wrapping_add(n)) >> 63);
            match total.compare_exchange(current, current.wrapping_add(n * fits)) {
                Ok(_) => return (current, fits != 0),
                Err(seen) => current = seen,
            }
        }
    }
    let previous = total.fetch_add(n);
    let within = previous.saturating_add(n) <= limit;
    if !within && !keep {
        total.fetch_sub(n);
    }
    (previous, within || keep)
}

/// A total's `(previous, taken)` passed through `hide`, as one word: the verifier then walks
/// what follows once, not once per try of the compare-and-swap that decided it. `None` from
/// `hide` (it does not happen) counts as a refusal that took nothing.
#[inline(always)]
fn through(taken: (u64, bool), hide: &impl Fn(u64) -> Option<u64>) -> (u64, bool) {
    match hide(taken.0 << 1 | u64::from(taken.1)) {
        Some(word) => (word >> 1, word & 1 != 0),
        None => (u64::MAX >> 1, false),
    }
}

/// Gives back what `reserve` took.
#[inline(always)]
pub fn release(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n);
}

/// Which budget refused a new task, in the order of `REASON_*` (the per-reason counters), not
/// of the checks. `admit` checks the instance's `max_tasks`, then `max_instances` (an instance
/// not yet admitted), `max_threads`, the fork rate, the type's total and the host's; the
/// programs check `max_age` before it (processes, new or moving in) and the breaker after it
/// (an instance it just admitted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The instance's own `max_tasks`.
    MaxTasks,
    MaxThreads,
    ForkRate,
    /// The type already has `max_instances` live instances: this one is not admitted.
    MaxInstances,
    /// The type's `max_total_tasks` across all its instances.
    TypeTasks,
    /// The host budget (`[host] max_tasks * deny_at`).
    HostTasks,
    /// The instance is past its `max_age` (and is to be frozen or killed).
    MaxAge,
    /// The type's circuit breaker refuses new instances.
    BreakerOpen,
}

/// Bit of an instance's task word that says the instance holds one of its type's
/// `max_instances` slots. Keeping it in the same word as the task count makes "admitted" and
/// "has live tasks" change together, atomically.
pub const ADMITTED: u64 = 1 << 63;
/// Bit of an instance's task word that says its last task left and its entry is being
/// reclaimed: nothing may enter it any more (a task that finds it so is let through, counted as
/// contended, and the next one finds a fresh entry).
pub const RECLAIMING: u64 = 1 << 62;
/// Bit of an instance's task word that says a task is admitting the instance (reserving one of
/// its type's slots for it): only that task may, see `enter_instance`.
pub const OPENING: u64 = 1 << 61;
pub const TASKS_MASK: u64 = OPENING - 1;

/// Live tasks in an instance's task word.
pub const fn word_tasks(word: u64) -> u64 {
    word & TASKS_MASK
}

/// The counters a new task is checked against and counted in, as atomics.
pub struct Counters<'a> {
    /// `ADMITTED | live tasks` of the instance.
    pub instance: &'a AtomicU64,
    pub processes: &'a AtomicU64,
    pub threads: &'a AtomicU64,
    pub rate_tat: &'a AtomicU64,
    /// Live (admitted) instances of the type.
    pub type_instances: &'a AtomicU64,
    pub type_tasks: &'a AtomicU64,
    pub host_tasks: &'a AtomicU64,
}

/// Every limit a new task (or a migrating process of `n` tasks) is checked against. A limit of
/// `u64::MAX` is no limit.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub max_tasks: u64,
    pub max_threads: u64,
    pub rate_interval_ns: u64,
    /// `rate_interval_ns * burst`.
    pub rate_window_ns: u64,
    pub max_instances: u64,
    pub max_type_tasks: u64,
    /// Host tasks above which new tasks are denied (`max_tasks * deny_at`).
    pub max_host_tasks: u64,
    /// Warning thresholds (usage at which a warning fires once on the way up).
    pub warn_tasks: u64,
    pub warn_type_tasks: u64,
    pub warn_host_tasks: u64,
    /// The type's fork-rate generation (`TypeLimits::rate_gen`).
    pub rate_gen: u64,
    pub enforce: bool,
}

impl Budget {
    pub const UNLIMITED: u64 = u64::MAX;

    /// A type's budget as its policy and the host's give it.
    #[inline(always)]
    pub const fn of(t: &TypeLimits, host: &HostLimits) -> Self {
        Self {
            max_tasks: t.max_tasks,
            max_threads: t.max_threads,
            rate_interval_ns: t.rate_interval_ns,
            rate_window_ns: t.rate_window_ns,
            max_instances: t.max_instances,
            max_type_tasks: t.max_total_tasks,
            max_host_tasks: host.deny_tasks,
            warn_tasks: t.warn_tasks,
            warn_type_tasks: t.warn_total_tasks,
            warn_host_tasks: host.warn_tasks,
            rate_gen: t.rate_gen as u64,
            enforce: t.mode == MODE_ENFORCE,
        }
    }
}

/// What a decision asks for: a fork is 1/0/1 (tasks/threads/processes), a thread 1/1/0, a
/// migrating process of n tasks n/n-1/1. Only new tasks take fork-rate tokens.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub tasks: u64,
    pub threads: u64,
    pub processes: u64,
    pub rate: bool,
    pub now: u64,
}

impl Request {
    /// A new process: one task, one process, a fork-rate token.
    pub const fn fork(now: u64) -> Self {
        Self {
            tasks: 1,
            threads: 0,
            processes: 1,
            rate: true,
            now,
        }
    }

    /// A new thread: one task, one thread, a fork-rate token.
    pub const fn thread(now: u64) -> Self {
        Self {
            tasks: 1,
            threads: 1,
            processes: 0,
            rate: true,
            now,
        }
    }
}

pub const WARN_INSTANCE_TASKS: u32 = 1;
pub const WARN_TYPE_TASKS: u32 = 2;
pub const WARN_HOST_TASKS: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The first budget that did not hold, if any. In audit mode the task is admitted and
    /// counted anyway.
    pub refusal: Option<Refusal>,
    /// The task is counted (false for an enforced refusal or a fail-open).
    pub counted: bool,
    /// The task opened the instance: it took one of the type's `max_instances` slots.
    pub opened: bool,
    /// `WARN_*` thresholds this task crossed on the way up.
    pub warnings: u32,
    /// Compare-and-swap on the instance kept losing to other CPUs: let through uncounted
    /// (fail open).
    pub contended: bool,
    /// The fork-rate bucket was too contended to update: let through (fail open).
    pub rate_contended: bool,
}

/// Every refusal, by code (`Admission::to_word`); a power of two long, for the mask there.
const REFUSALS: [Refusal; 8] = [
    Refusal::MaxTasks,
    Refusal::MaxThreads,
    Refusal::ForkRate,
    Refusal::MaxInstances,
    Refusal::TypeTasks,
    Refusal::HostTasks,
    Refusal::MaxAge,
    Refusal::BreakerOpen,
];

const _: () = assert!(REFUSALS.len().is_power_of_two());

impl Admission {
    /// The admission as one word: bits 0-3 the refusal (0 none, else 1 + its place in
    /// `Refusal`), 4 counted, 5 opened, 6 contended, 7 rate_contended, 8-15 warnings.
    pub fn to_word(&self) -> u64 {
        let refusal = match self.refusal {
            None => 0,
            Some(r) => 1 + r as u64,
        };
        refusal
            | (self.counted as u64) << 4
            | (self.opened as u64) << 5
            | (self.contended as u64) << 6
            | (self.rate_contended as u64) << 7
            | ((self.warnings & 0xff) as u64) << 8
    }

    pub fn from_word(word: u64) -> Self {
        let code = (word & 0xf) as usize;
        Self {
            // Masked, not `get`: LLVM may compute the table address before the bounds check,
            // which verifiers before 6.18 refuse (an offset of -1 into the table).
            refusal: if code == 0 {
                None
            } else {
                Some(REFUSALS[(code - 1) & (REFUSALS.len() - 1)])
            },
            counted: word & 1 << 4 != 0,
            opened: word & 1 << 5 != 0,
            contended: word & 1 << 6 != 0,
            rate_contended: word & 1 << 7 != 0,
            warnings: ((word >> 8) & 0xff) as u32,
        }
    }

    /// Let through uncounted: the decision could not be made (fail open).
    pub const fn contended() -> Self {
        Self {
            refusal: None,
            counted: false,
            opened: false,
            warnings: 0,
            contended: true,
            rate_contended: false,
        }
    }

    pub const fn refused(refusal: Refusal) -> Self {
        Self {
            refusal: Some(refusal),
            counted: false,
            opened: false,
            warnings: 0,
            contended: false,
            rate_contended: false,
        }
    }
}

#[inline(always)]
const fn crossed(previous: u64, n: u64, threshold: u64) -> bool {
    previous < threshold && previous.saturating_add(n) >= threshold
}

enum Entry {
    Entered { opened: bool, previous: u64 },
    Refused(Refusal),
    Contended,
}

/// Adds `n` tasks to an instance, admitting it (taking one of the type's instance slots) when
/// it has none. Over-budget in audit mode is reported through `over`.
///
/// Only one task may admit an instance: the one that marks it `OPENING`. It alone reserves a
/// slot, so two tasks entering a new instance at once never take two slots between them, nor
/// does the second find the last slot taken by its own instance and get refused. A task that
/// finds the mark (or the entry being reclaimed) is let through, counted as contended: a BPF
/// program cannot wait for another's verdict.
#[inline(always)]
fn enter_instance(c: &Counters<'_>, b: &Budget, n: u64, over: &mut Option<Refusal>) -> Entry {
    let mut current = c.instance.load();
    for _ in 0..CAS_ATTEMPTS {
        let tasks = word_tasks(current);
        if tasks.saturating_add(n) > b.max_tasks {
            if b.enforce {
                return Entry::Refused(Refusal::MaxTasks);
            }
            *over = Some(Refusal::MaxTasks);
        }
        if current & (OPENING | RECLAIMING) != 0 {
            return Entry::Contended;
        }
        let admitted = current & ADMITTED != 0;
        // Admitted: join it. Not admitted: mark it.
        let next = if admitted {
            current + n
        } else {
            current | OPENING
        };
        match c.instance.compare_exchange(current, next) {
            Ok(_) if admitted => {
                return Entry::Entered {
                    opened: false,
                    previous: tasks,
                };
            }
            Ok(_) => return open_instance(c, b, n, over, tasks),
            Err(seen) => current = seen,
        }
    }
    enter_admitted_by_add(c, b, n, over)
}

/// This task marked the instance `OPENING`: it takes one of the type's slots for it, or is
/// refused. No other task changes a marked word's flags (they let themselves through, and
/// exits only take tasks away), so it finishes with an add, which no contention can fail.
#[inline(always)]
fn open_instance(
    c: &Counters<'_>,
    b: &Budget,
    n: u64,
    over: &mut Option<Refusal>,
    previous: u64,
) -> Entry {
    if !reserve(c.type_instances, 1, b.max_instances, !b.enforce) {
        if b.enforce {
            c.instance.fetch_sub(OPENING);
            return Entry::Refused(Refusal::MaxInstances);
        }
        if over.is_none() {
            *over = Some(Refusal::MaxInstances);
        }
    }
    c.instance.fetch_add((ADMITTED - OPENING) + n);
    Entry::Entered {
        opened: true,
        previous,
    }
}

/// After the compare-and-swap lost every try: joins an admitted instance with a plain add
/// (reserve, then check), so a contended task is still counted and held to `max_tasks`.
/// Contention is the normal case, not a rarity, where the compare-and-swap is emulated under
/// one lock (kernels before 5.12: a lock holder preempted, or a vCPU descheduled, makes every
/// other CPU miss it). Only an instance that is not admitted stays contended (fail open):
/// admitting takes a slot, which needs the compare-and-swap. A refusal undoes the add through
/// `leave_instance`, so an instance whose last task left meanwhile still gives back its slot.
#[inline(always)]
fn enter_admitted_by_add(
    c: &Counters<'_>,
    b: &Budget,
    n: u64,
    over: &mut Option<Refusal>,
) -> Entry {
    // Read first: an add to a word that tasks admitting the instance compare against would
    // make them lose too.
    if c.instance.load() & ADMITTED == 0 {
        return Entry::Contended;
    }
    let previous = c.instance.fetch_add(n);
    if previous & ADMITTED == 0 {
        // It closed since the read.
        leave_instance(c, n);
        return Entry::Contended;
    }
    let tasks = word_tasks(previous);
    if tasks.saturating_add(n) > b.max_tasks {
        if b.enforce {
            leave_instance(c, n);
            return Entry::Refused(Refusal::MaxTasks);
        }
        *over = Some(Refusal::MaxTasks);
    }
    Entry::Entered {
        opened: false,
        previous: tasks,
    }
}

/// What leaving did to the instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Left {
    /// The last task left: the instance gave back its slot (it ended, for the breaker).
    pub closed: bool,
    /// The instance held fewer tasks than left (counts had drifted; clamped at 0).
    pub drift: bool,
}

/// Marks an instance with no tasks whose entry may go (its last task left, or its first was
/// refused): true for the one caller that may remove the entry. Whoever enters after this sees
/// the mark and does not count in the entry that is going.
#[inline(always)]
pub fn start_reclaim(c: &Counters<'_>) -> bool {
    c.instance.compare_exchange(0, RECLAIMING).is_ok()
}

/// Removes `n` tasks from an instance; the last one out gives back the instance's slot. The
/// decrement is a single fetch-and-sub (it must never be lost, however contended the word);
/// only the last one out races, with a compare-and-swap, to release the slot.
#[inline(always)]
pub fn leave_instance(c: &Counters<'_>, n: u64) -> Left {
    let previous = c.instance.fetch_sub(n);
    let tasks = word_tasks(previous);
    let mut drift = false;
    if tasks < n {
        // Fewer tasks than leaving: the subtraction borrowed from the admitted bit. Put back
        // what was not there, so the word reads "admitted, 0 tasks" (or 0).
        drift = true;
        c.instance.fetch_add(n - tasks);
    }
    let closed =
        previous & ADMITTED != 0 && tasks <= n && c.instance.compare_exchange(ADMITTED, 0).is_ok();
    if closed {
        release(c.type_instances, 1);
    }
    Left { closed, drift }
}

/// Decides whether `r` may enter, and counts it when it may. Budgets are checked in the order
/// `Refusal` gives; whatever was taken before a refusal is given back.
#[inline(always)]
pub fn admit(c: &Counters<'_>, b: &Budget, r: &Request) -> Admission {
    admit_through(c, b, r, Some)
}

/// `admit`, with what entering the instance decided (opened, tasks before, audit overrun)
/// passed through `hide` as one word. `admit` passes it unchanged; the eBPF programs pass a
/// copy the verifier cannot follow, so that it walks the rest of the admission once, not once
/// per way of entering (see `opaque` in the eBPF crate). `None` from `hide`: the entry is
/// undone and the task let through uncounted (fail open).
#[inline(always)]
pub fn admit_through(
    c: &Counters<'_>,
    b: &Budget,
    r: &Request,
    hide: impl Fn(u64) -> Option<u64>,
) -> Admission {
    let keep = !b.enforce;
    let mut over = None;
    let (opened, previous) = match enter_instance(c, b, r.tasks, &mut over) {
        Entry::Entered { opened, previous } => (opened, previous),
        Entry::Refused(why) => return Admission::refused(why),
        Entry::Contended => return Admission::contended(),
    };
    let over_code = match over {
        Some(Refusal::MaxTasks) => 1,
        Some(_) => 2,
        None => 0,
    };
    let Some(entered) = hide(previous << 3 | over_code << 1 | opened as u64) else {
        leave_instance(c, r.tasks);
        return Admission::contended();
    };
    let opened = entered & 1 != 0;
    let over = match (entered >> 1) & 3 {
        1 => Some(Refusal::MaxTasks),
        2 => Some(Refusal::MaxInstances),
        _ => None,
    };
    let previous = entered >> 3;
    let mut warnings = 0;
    if crossed(previous, r.tasks, b.warn_tasks) {
        warnings |= WARN_INSTANCE_TASKS;
    }
    // Each step: reserve, or give back everything taken so far and refuse.
    let mut taken_threads = false;
    let mut taken_type = false;
    let mut taken_host = false;
    let mut refusal: Option<Refusal> = None;
    if r.threads > 0 {
        if !reserve(c.threads, r.threads, b.max_threads, keep) {
            refusal = Some(Refusal::MaxThreads);
        } else {
            taken_threads = true;
        }
        taken_threads |= keep;
    }
    // The fork-rate token before the shared totals: a fork refused by its own instance's rate
    // never holds a unit of the type's or the host's, where it could refuse other instances.
    // A token taken for a task refused further on is given back.
    let mut rate_contended = false;
    let mut taken_token = false;
    if (refusal.is_none() || keep) && r.rate && b.rate_interval_ns != 0 {
        match take_token(
            c.rate_tat,
            r.now,
            b.rate_interval_ns,
            b.rate_window_ns,
            b.rate_gen,
        ) {
            Token::Taken => taken_token = true,
            Token::Contended => rate_contended = true,
            Token::Empty => refusal = refusal.or(Some(Refusal::ForkRate)),
        }
    }
    // The type's and the host's totals are written out one after the other, not as a loop
    // over both: the loop form costs the verifier enough states on cgroup_attach_task to pass
    // its one-million-instruction limit (tried).
    if refusal.is_none() || keep {
        let (previous, taken) = through(
            take_total(c.type_tasks, r.tasks, b.max_type_tasks, keep),
            &hide,
        );
        taken_type = taken;
        if previous.saturating_add(r.tasks) > b.max_type_tasks {
            refusal = refusal.or(Some(Refusal::TypeTasks));
        } else if crossed(previous, r.tasks, b.warn_type_tasks) {
            warnings |= WARN_TYPE_TASKS;
        }
    }
    if refusal.is_none() || keep {
        let (previous, taken) = through(
            take_total(c.host_tasks, r.tasks, b.max_host_tasks, keep),
            &hide,
        );
        taken_host = taken;
        if previous.saturating_add(r.tasks) > b.max_host_tasks {
            refusal = refusal.or(Some(Refusal::HostTasks));
        } else if crossed(previous, r.tasks, b.warn_host_tasks) {
            warnings |= WARN_HOST_TASKS;
        }
    }
    if let Some(why) = refusal.filter(|_| b.enforce) {
        if taken_token {
            refund_token(c.rate_tat, b.rate_interval_ns);
        }
        if taken_host {
            release(c.host_tasks, r.tasks);
        }
        if taken_type {
            release(c.type_tasks, r.tasks);
        }
        if taken_threads {
            release(c.threads, r.threads);
        }
        leave_instance(c, r.tasks);
        return Admission::refused(why);
    }
    if r.processes > 0 {
        c.processes.fetch_add(r.processes);
    }
    Admission {
        refusal: over.or(refusal),
        counted: true,
        opened,
        warnings,
        contended: false,
        rate_contended,
    }
}

/// What a type and the host hold now: the shared totals a new instance's admission reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedUsage {
    /// Admitted instances of the type.
    pub type_instances: u64,
    pub type_tasks: u64,
    pub host_tasks: u64,
}

/// Why a new instance's first process would be refused now (`None`: it would be admitted, or
/// the type is not enforced), decided by `admit` itself on copies of the totals, so that a
/// preview (`spawnguard gate`) and the kernel cannot disagree. Nothing is taken. The breaker is
/// `breaker_gate`'s to preview; a new instance's fork-rate bucket starts full.
pub fn preview_new_instance(b: &Budget, usage: &SharedUsage) -> Option<Refusal> {
    let fresh = || AtomicU64::new(0);
    let (instance, processes, threads, rate_tat) = (fresh(), fresh(), fresh(), fresh());
    let type_instances = AtomicU64::new(usage.type_instances);
    let type_tasks = AtomicU64::new(usage.type_tasks);
    let host_tasks = AtomicU64::new(usage.host_tasks);
    let c = Counters {
        instance: &instance,
        processes: &processes,
        threads: &threads,
        rate_tat: &rate_tat,
        type_instances: &type_instances,
        type_tasks: &type_tasks,
        host_tasks: &host_tasks,
    };
    let first = Request {
        rate: false,
        ..Request::fork(0)
    };
    let adm = admit(&c, b, &first);
    if adm.counted {
        None
    } else {
        adm.refusal
    }
}

/// Uncounts tasks that leave: `tasks` tasks of which `threads` threads and `processes`
/// processes (an exiting thread 1/1/0, a process's last task 1/0/1, a process migrating out
/// n/n-1/1).
#[inline(always)]
pub fn release_tasks(c: &Counters<'_>, tasks: u64, threads: u64, processes: u64) -> Left {
    let left = leave_instance(c, tasks);
    if threads > 0 {
        release(c.threads, threads);
    }
    if processes > 0 {
        release(c.processes, processes);
    }
    release(c.type_tasks, tasks);
    release(c.host_tasks, tasks);
    left
}

/// Counts tasks with no budget checked: the inverse of `release_tasks`, for an instance that
/// holds tasks. A refused thread that cannot be marked as refused is counted so, for the instant
/// it takes to stop it, so that its exit gives back only what it holds.
#[inline(always)]
pub fn charge_tasks(c: &Counters<'_>, tasks: u64, threads: u64, processes: u64) {
    c.instance.fetch_add(tasks);
    if threads > 0 {
        c.threads.fetch_add(threads);
    }
    if processes > 0 {
        c.processes.fetch_add(processes);
    }
    c.type_tasks.fetch_add(tasks);
    c.host_tasks.fetch_add(tasks);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{sync::Arc, thread, vec, vec::Vec};

    use super::*;

    /// Counters of one instance plus its type's and the host's.
    struct Fixture([AtomicU64; 7]);

    impl Fixture {
        fn new() -> Self {
            Self(core::array::from_fn(|_| AtomicU64::new(0)))
        }
        fn counters(&self) -> Counters<'_> {
            self.shared(&self.0[4], &self.0[5], &self.0[6])
        }
        /// This instance, with type/host counters owned elsewhere.
        fn shared<'a>(
            &'a self,
            instances: &'a AtomicU64,
            type_tasks: &'a AtomicU64,
            host: &'a AtomicU64,
        ) -> Counters<'a> {
            Counters {
                instance: &self.0[0],
                processes: &self.0[1],
                threads: &self.0[2],
                rate_tat: &self.0[3],
                type_instances: instances,
                type_tasks,
                host_tasks: host,
            }
        }
        fn tasks(&self) -> u64 {
            word_tasks(self.0[0].load())
        }
        fn get(&self, i: usize) -> u64 {
            self.0[i].load()
        }
    }

    const NO_LIMIT: u64 = Budget::UNLIMITED;

    fn budget(max_tasks: u64, max_threads: u64, enforce: bool) -> Budget {
        Budget {
            max_tasks,
            max_threads,
            rate_interval_ns: 0,
            rate_window_ns: 0,
            max_instances: NO_LIMIT,
            max_type_tasks: NO_LIMIT,
            max_host_tasks: NO_LIMIT,
            warn_tasks: NO_LIMIT,
            warn_type_tasks: NO_LIMIT,
            warn_host_tasks: NO_LIMIT,
            rate_gen: 0,
            enforce,
        }
    }

    const FORK: Request = Request::fork(0);
    const THREAD: Request = Request::thread(0);

    fn usage(type_instances: u64, type_tasks: u64, host_tasks: u64) -> SharedUsage {
        SharedUsage {
            type_instances,
            type_tasks,
            host_tasks,
        }
    }

    #[test]
    fn a_new_instance_preview_names_the_admission_s_refusal() {
        let b = Budget {
            max_instances: 2,
            max_type_tasks: 10,
            max_host_tasks: 20,
            ..budget(5, NO_LIMIT, true)
        };
        let cases = [
            (usage(1, 9, 19), None),
            (usage(2, 0, 0), Some(Refusal::MaxInstances)),
            (usage(0, 10, 0), Some(Refusal::TypeTasks)),
            (usage(0, 0, 20), Some(Refusal::HostTasks)),
            // In the order the admission checks them.
            (usage(2, 10, 20), Some(Refusal::MaxInstances)),
            (usage(1, 10, 20), Some(Refusal::TypeTasks)),
        ];
        for (u, want) in cases {
            assert_eq!(preview_new_instance(&b, &u), want, "{u:?}");
        }
        assert_eq!(
            preview_new_instance(&budget(0, NO_LIMIT, true), &usage(0, 0, 0)),
            Some(Refusal::MaxTasks)
        );
        // Audit mode admits, over budget or not; so does a fork rate (a new bucket is full).
        let audit = Budget {
            enforce: false,
            ..b
        };
        assert_eq!(preview_new_instance(&audit, &usage(2, 10, 20)), None);
        let rated = Budget {
            rate_interval_ns: 1_000_000_000,
            rate_window_ns: 1_000_000_000,
            ..b
        };
        assert_eq!(preview_new_instance(&rated, &usage(0, 0, 0)), None);
    }

    /// For random budgets and usages, the preview says what a first process entering a new
    /// instance is then told, and takes nothing.
    #[test]
    fn a_new_instance_preview_agrees_with_the_admission() {
        // xorshift64: deterministic, so a failure names its case.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for round in 0..20_000 {
            // (A policy's burst is at least 1: the window holds one interval or more.)
            let interval = 1_000 * next(2);
            let window = interval * (1 + next(3));
            let enforce = next(4) != 0;
            let mut limit = |most: u64| match next(most + 2) {
                0 => NO_LIMIT,
                n => n - 1,
            };
            let b = Budget {
                max_instances: limit(4),
                max_type_tasks: limit(8),
                max_host_tasks: limit(12),
                rate_interval_ns: interval,
                rate_window_ns: window,
                ..budget(limit(3), NO_LIMIT, enforce)
            };
            let u = usage(next(6), next(10), next(14));
            let preview = preview_new_instance(&b, &u);
            let f = Fixture::new();
            f.0[4].store(u.type_instances);
            f.0[5].store(u.type_tasks);
            f.0[6].store(u.host_tasks);
            let adm = admit(&f.counters(), &b, &Request::fork(0));
            let decided = if adm.counted { None } else { adm.refusal };
            assert_eq!(preview, decided, "round {round}: {b:?} {u:?}");
            assert!(!adm.contended, "round {round}");
        }
    }

    #[test]
    fn an_admission_survives_its_word() {
        let mut all = vec![None];
        all.extend(REFUSALS.map(Some));
        for refusal in all {
            for bits in 0..16u32 {
                for warnings in [0, WARN_INSTANCE_TASKS, WARN_TYPE_TASKS | WARN_HOST_TASKS, 7] {
                    let adm = Admission {
                        refusal,
                        counted: bits & 1 != 0,
                        opened: bits & 2 != 0,
                        contended: bits & 4 != 0,
                        rate_contended: bits & 8 != 0,
                        warnings,
                    };
                    assert_eq!(Admission::from_word(adm.to_word()), adm);
                }
            }
        }
        assert_eq!(
            REFUSALS.len(),
            spawnguard_common::REASONS,
            "one code per reason"
        );
        for (i, r) in REFUSALS.iter().enumerate() {
            assert_eq!(*r as usize, i, "REFUSALS in declaration order");
        }
    }

    #[test]
    fn an_entry_that_cannot_be_passed_on_is_undone() {
        let f = Fixture::new();
        let b = budget(10, 10, true);
        let adm = admit_through(&f.counters(), &b, &FORK, |_| None);
        assert_eq!(adm, Admission::contended());
        assert_eq!(f.0[0].load(), 0, "the instance is empty and not admitted");
        assert_eq!(f.get(4), 0, "its instance slot is given back");
        let adm = admit_through(&f.counters(), &b, &FORK, Some);
        assert!(adm.counted && adm.opened);
        assert_eq!(f.0[0].load(), ADMITTED | 1);
    }

    #[test]
    fn a_contended_entry_joins_an_admitted_instance_by_add() {
        let f = Fixture::new();
        let c = f.counters();
        let mut over = None;
        // Not admitted: nothing changes, the task is let through uncounted.
        let entry = enter_admitted_by_add(&c, &budget(2, 10, true), 1, &mut over);
        assert!(matches!(entry, Entry::Contended));
        assert_eq!(f.0[0].load(), 0);
        // Admitted: counted, up to max_tasks and not beyond.
        f.0[0].store(ADMITTED | 1);
        let entry = enter_admitted_by_add(&c, &budget(2, 10, true), 1, &mut over);
        assert!(matches!(
            entry,
            Entry::Entered {
                opened: false,
                previous: 1
            }
        ));
        let entry = enter_admitted_by_add(&c, &budget(2, 10, true), 1, &mut over);
        assert!(matches!(entry, Entry::Refused(Refusal::MaxTasks)));
        assert_eq!(f.0[0].load(), ADMITTED | 2, "the refused add is undone");
        assert_eq!(over, None);
        // Audit mode: counted past max_tasks and reported.
        let entry = enter_admitted_by_add(&c, &budget(2, 10, false), 1, &mut over);
        assert!(matches!(entry, Entry::Entered { previous: 2, .. }));
        assert_eq!(over, Some(Refusal::MaxTasks));
        assert_eq!(f.0[0].load(), ADMITTED | 3);
        // A refusal that finds the instance emptied gives back its slot, as a last exit would.
        f.0[0].store(ADMITTED);
        f.0[4].store(1);
        let entry = enter_admitted_by_add(&c, &budget(0, 10, true), 1, &mut over);
        assert!(matches!(entry, Entry::Refused(Refusal::MaxTasks)));
        assert_eq!(f.0[0].load(), 0, "closed");
        assert_eq!(f.get(4), 0, "its instance slot is given back");
    }

    #[test]
    fn reserve_stops_at_limit() {
        let c = AtomicU64::new(0);
        for _ in 0..3 {
            assert!(reserve(&c, 1, 3, false));
        }
        assert!(!reserve(&c, 1, 3, false));
        assert_eq!(c.load(), 3);
        assert!(!reserve(&c, 1, 3, true), "audit keeps the task but reports");
        assert_eq!(c.load(), 4);
        assert!(!reserve(&AtomicU64::new(2), 2, 3, false), "a whole group");
    }

    #[test]
    fn racing_reservations_never_overshoot() {
        for _ in 0..50 {
            let c = Arc::new(AtomicU64::new(0));
            let wins: Vec<_> = (0..8)
                .map(|_| {
                    let c = Arc::clone(&c);
                    thread::spawn(move || (0..1000).filter(|_| reserve(&c, 1, 40, false)).count())
                })
                .collect();
            let won: usize = wins.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(won, 40);
            assert_eq!(c.load(), 40);
        }
    }

    #[test]
    fn an_empty_instance_is_reclaimed_once_and_then_not_entered() {
        let f = Fixture::new();
        let c = f.counters();
        let b = budget(10, 10, true);
        assert!(admit(&c, &b, &FORK).counted);
        assert!(
            !start_reclaim(&c),
            "an instance with a task is not reclaimed"
        );
        assert!(release_tasks(&c, 1, 0, 1).closed);
        assert!(start_reclaim(&c));
        assert!(!start_reclaim(&c), "only one caller removes the entry");
        // A task that still finds the entry going is let through, counted as contended, and
        // leaves no count behind in it.
        assert_eq!(admit(&c, &b, &FORK), Admission::contended());
        assert_eq!(f.0[0].load(), RECLAIMING);
        assert_eq!((f.get(4), f.get(5), f.get(6)), (0, 0, 0));
    }

    #[test]
    fn admit_checks_tasks_then_threads_then_rate() {
        let f = Fixture::new();
        let c = f.counters();
        let b = budget(3, 1, true);
        assert_eq!(admit(&c, &b, &FORK).refusal, None);
        assert_eq!(admit(&c, &b, &THREAD).refusal, None);
        let r = admit(&c, &b, &THREAD);
        assert_eq!(r.refusal, Some(Refusal::MaxThreads));
        assert!(!r.counted);
        assert_eq!(admit(&c, &b, &FORK).refusal, None);
        assert_eq!(admit(&c, &b, &FORK).refusal, Some(Refusal::MaxTasks));
        assert_eq!((f.tasks(), f.get(1), f.get(2)), (3, 2, 1));
        assert_eq!((f.get(5), f.get(6)), (3, 3), "type and host follow");
    }

    #[test]
    fn rate_refusal_gives_everything_back() {
        let f = Fixture::new();
        let c = f.counters();
        let b = Budget {
            rate_interval_ns: 1_000,
            rate_window_ns: 1_000,
            ..budget(10, 10, true)
        };
        assert!(admit(&c, &b, &FORK).counted);
        let r = admit(&c, &b, &FORK);
        assert_eq!(r.refusal, Some(Refusal::ForkRate));
        assert_eq!((f.tasks(), f.get(5), f.get(6)), (1, 1, 1));
        let migration = Request {
            rate: false,
            ..FORK
        };
        assert!(admit(&c, &b, &migration).counted);
    }

    #[test]
    fn audit_counts_and_reports() {
        let f = Fixture::new();
        let c = f.counters();
        let b = Budget {
            max_instances: 0,
            ..budget(1, 0, false)
        };
        let first = admit(&c, &b, &FORK);
        assert_eq!(first.refusal, Some(Refusal::MaxInstances));
        assert!(first.counted && first.opened);
        let r = admit(&c, &b, &THREAD);
        assert_eq!(r.refusal, Some(Refusal::MaxTasks));
        assert!(r.counted);
        assert_eq!((f.tasks(), f.get(2)), (2, 1));
    }

    /// A refused thread that cannot be marked is charged past the budget and stopped: its
    /// exit, and its process's, give back exactly what was taken, and the instance closes.
    #[test]
    fn a_thread_charged_past_its_budget_is_given_back_by_its_exit() {
        let f = Fixture::new();
        let c = f.counters();
        let b = budget(2, 10, true);
        assert!(admit(&c, &b, &FORK).counted);
        assert!(admit(&c, &b, &THREAD).counted);
        assert!(!admit(&c, &b, &THREAD).counted, "at its budget");
        charge_tasks(&c, 1, 1, 0);
        assert_eq!(f.tasks(), 3, "counted past the budget until it is stopped");
        assert!(!admit(&c, &b, &THREAD).counted, "still refusing meanwhile");
        assert!(!release_tasks(&c, 1, 1, 0).closed);
        assert!(!release_tasks(&c, 1, 1, 0).closed);
        let last = release_tasks(&c, 1, 0, 1);
        assert!(last.closed && !last.drift, "{last:?}");
        assert!((0..7).filter(|&i| i != 3).all(|i| f.get(i) == 0));
    }

    #[test]
    fn exits_and_migrations_balance() {
        let f = Fixture::new();
        let c = f.counters();
        let b = budget(10, 10, true);
        admit(&c, &b, &FORK);
        admit(&c, &b, &THREAD);
        admit(&c, &b, &THREAD);
        assert_eq!(f.get(4), 1, "one live instance");
        assert!(!release_tasks(&c, 1, 1, 0).closed);
        assert_eq!(
            release_tasks(&c, 2, 1, 1),
            Left {
                closed: true,
                drift: false
            }
        );
        assert!(
            (0..7).filter(|&i| i != 3).all(|i| f.get(i) == 0),
            "all back to 0"
        );
        let moving_in = Request {
            tasks: 4,
            threads: 3,
            processes: 1,
            rate: false,
            now: 0,
        };
        assert!(admit(&c, &b, &moving_in).counted);
        for _ in 0..3 {
            release_tasks(&c, 1, 1, 0);
        }
        release_tasks(&c, 1, 0, 1);
        assert!((0..7).filter(|&i| i != 3).all(|i| f.get(i) == 0));
        assert!(
            release_tasks(&c, 1, 0, 0).drift,
            "drift is reported, not wrapped"
        );
        assert_eq!(f.get(0), 0);
    }

    #[test]
    fn ceiling_refuses_new_instances_not_new_tasks() {
        let (slots, type_tasks, host) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let b = Budget {
            max_instances: 2,
            ..budget(10, 10, true)
        };
        let inst: Vec<Fixture> = (0..3).map(|_| Fixture::new()).collect();
        let c: Vec<Counters<'_>> = inst
            .iter()
            .map(|f| f.shared(&slots, &type_tasks, &host))
            .collect();
        assert!(admit(&c[0], &b, &FORK).opened);
        assert!(admit(&c[1], &b, &FORK).opened);
        assert_eq!(admit(&c[2], &b, &FORK).refusal, Some(Refusal::MaxInstances));
        assert!(
            admit(&c[0], &b, &FORK).counted,
            "admitted instances keep growing"
        );
        assert_eq!(word_tasks(inst[2].0[0].load()), 0);
        // The last task of instance 1 leaves: its slot frees, instance 2 gets in.
        release_tasks(&c[1], 1, 0, 1);
        assert_eq!(slots.load(), 1);
        assert!(admit(&c[2], &b, &FORK).opened);
        assert_eq!(slots.load(), 2);
    }

    #[test]
    fn racing_instances_for_the_last_slot_one_wins() {
        for _ in 0..200 {
            let slots = Arc::new(AtomicU64::new(2));
            let shared = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (slots, shared) = (Arc::clone(&slots), Arc::clone(&shared));
                    thread::spawn(move || {
                        let f = Fixture::new();
                        let c = f.shared(&slots, &shared.0, &shared.1);
                        let b = Budget {
                            max_instances: 3,
                            ..budget(10, 10, true)
                        };
                        admit(&c, &b, &FORK).counted
                    })
                })
                .collect();
            let won = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&w| w)
                .count();
            assert_eq!(won, 1);
            assert_eq!(slots.load(), 3);
        }
    }

    /// What a racing task got: counted, let through uncounted (contended), or refused (why).
    fn outcome(adm: Admission) -> Result<bool, Refusal> {
        match adm.refusal {
            Some(why) if !adm.counted => Err(why),
            _ => Ok(adm.counted),
        }
    }

    /// Runs `tasks` on threads released together (a barrier), `rounds` times; each gets the
    /// round's shared state. Returns every round's outcomes.
    fn race<S: Send + Sync + 'static, T: Send + 'static>(
        rounds: usize,
        state: impl Fn() -> S,
        tasks: &[fn(&S) -> T],
        mut check: impl FnMut(&S, Vec<T>),
    ) {
        for _ in 0..rounds {
            let shared = Arc::new((state(), std::sync::Barrier::new(tasks.len())));
            let handles: Vec<_> = tasks
                .iter()
                .map(|&task| {
                    let shared = Arc::clone(&shared);
                    thread::spawn(move || {
                        shared.1.wait();
                        task(&shared.0)
                    })
                })
                .collect();
            let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
            check(&shared.0, results);
        }
    }

    /// Two instances of one type: their own counters, the type's slots and tasks, the host's.
    struct TwoInstances(Fixture, Fixture, AtomicU64, AtomicU64, AtomicU64);

    impl TwoInstances {
        fn new(type_tasks: u64, host_tasks: u64) -> Self {
            Self(
                Fixture::new(),
                Fixture::new(),
                AtomicU64::new(0),
                AtomicU64::new(type_tasks),
                AtomicU64::new(host_tasks),
            )
        }
        fn a(&self) -> Counters<'_> {
            self.0.shared(&self.2, &self.3, &self.4)
        }
        fn b(&self) -> Counters<'_> {
            self.1.shared(&self.2, &self.3, &self.4)
        }
        /// The type's tasks and the host's.
        fn totals(&self) -> (u64, u64) {
            (self.3.load(), self.4.load())
        }
    }

    /// A process entering an instance and leaving it, 200 times; the first refusal, if any.
    fn enter_and_leave(c: &Counters<'_>, b: &Budget, r: &Request) -> Result<bool, Refusal> {
        for _ in 0..200 {
            outcome(admit(c, b, r))?;
            release_tasks(c, 1, 0, 1);
        }
        Ok(true)
    }

    /// Enough rounds to see the races of the old reservations (about 1 round in 100 lost).
    const RACE_ROUNDS: usize = 10_000;

    #[test]
    fn racing_tasks_into_one_new_instance_take_one_slot_and_none_is_refused() {
        // One slot left for the type: the instance's first tasks race for it. Each is counted,
        // or let through (it found another admitting the instance); none is refused, and the
        // instance takes one slot.
        fn enter(s: &(Fixture, AtomicU64, AtomicU64, AtomicU64)) -> Result<bool, Refusal> {
            let b = Budget {
                max_instances: 3,
                ..budget(10, 10, true)
            };
            outcome(admit(&s.0.shared(&s.1, &s.2, &s.3), &b, &FORK))
        }
        let state = || {
            let slots = AtomicU64::new(2);
            (Fixture::new(), slots, AtomicU64::new(0), AtomicU64::new(0))
        };
        let mut counted_all = 0;
        race(RACE_ROUNDS, state, &[enter, enter, enter], |s, results| {
            assert!(
                results.iter().all(|r| r.is_ok()),
                "a task refused by its own instance's admission: {results:?}"
            );
            let counted = results.iter().filter(|r| **r == Ok(true)).count() as u64;
            assert!(counted >= 1, "the instance's admitter is counted");
            assert_eq!(s.1.load(), 3, "one instance, one slot");
            assert_eq!(s.0 .0[0].load(), ADMITTED | counted);
            assert_eq!((s.2.load(), s.3.load()), (counted, counted));
            counted_all += u64::from(counted == 3);
        });
        // Most rounds do not race at all (threads start apart): every task is counted.
        assert!(counted_all > 0);
    }

    #[test]
    fn a_new_instance_never_refuses_another_for_a_slot_it_does_not_take() {
        // Two slots free: instance X's two first tasks race with instance Y's. X takes one
        // slot, Y the other; no CAS loser of X holds a second one while Y looks.
        fn b() -> Budget {
            Budget {
                max_instances: 2,
                ..budget(10, 10, true)
            }
        }
        fn x(s: &TwoInstances) -> Result<bool, Refusal> {
            outcome(admit(&s.a(), &b(), &FORK))
        }
        fn y(s: &TwoInstances) -> Result<bool, Refusal> {
            outcome(admit(&s.b(), &b(), &FORK))
        }
        let state = || TwoInstances::new(0, 0);
        race(RACE_ROUNDS, state, &[x, x, y], |s, results| {
            assert!(
                results.iter().all(|r| r.is_ok()),
                "refused with a slot free for it: {results:?}"
            );
            assert_eq!(results[2], Ok(true), "Y's only task admits it");
            assert_eq!(s.2.load(), 2);
        });
    }

    #[test]
    fn a_rate_limited_instance_never_refuses_others_at_the_type_limit() {
        // The type holds 2 tasks; A holds 1 and its bucket is empty. A forks hard (every fork
        // refused by its rate) while B enters and leaves its one task: B is never refused,
        // although the type is one task from its limit all along.
        fn b() -> Budget {
            Budget {
                max_type_tasks: 2,
                max_host_tasks: 2,
                rate_interval_ns: 1_000_000_000_000,
                rate_window_ns: 1_000_000_000_000,
                ..budget(10, 10, true)
            }
        }
        fn a(s: &TwoInstances) -> Result<bool, Refusal> {
            for _ in 0..200 {
                assert_eq!(outcome(admit(&s.a(), &b(), &FORK)), Err(Refusal::ForkRate));
            }
            Ok(true)
        }
        fn other(s: &TwoInstances) -> Result<bool, Refusal> {
            let migration = Request {
                rate: false,
                ..FORK
            };
            enter_and_leave(&s.b(), &b(), &migration)
        }
        let state = || {
            let s = TwoInstances::new(0, 0);
            // A's one task, and its one token, taken.
            assert!(admit(&s.a(), &b(), &FORK).counted);
            s
        };
        race(RACE_ROUNDS / 10, state, &[a, other], |s, results| {
            assert_eq!(results, vec![Ok(true), Ok(true)], "B was refused");
            assert_eq!(s.totals(), (1, 1), "only A's task is left");
        });
    }

    #[test]
    fn a_refused_migration_never_refuses_a_fork_that_fits_the_type() {
        // The type has 5 of its 10 tasks free. A process of 8 tasks keeps trying to move into
        // instance A (refused: it does not fit) while a task of instance B enters and leaves:
        // B always fits, and is never refused for units the refused move held.
        fn b() -> Budget {
            Budget {
                max_type_tasks: 10,
                max_host_tasks: 10,
                ..budget(100, 100, true)
            }
        }
        fn migrate(s: &TwoInstances) -> Result<bool, Refusal> {
            let c = s.a();
            let process = Request {
                tasks: 8,
                threads: 7,
                processes: 1,
                rate: false,
                now: 0,
            };
            for _ in 0..200 {
                assert_eq!(outcome(admit(&c, &b(), &process)), Err(Refusal::TypeTasks));
            }
            Ok(true)
        }
        fn fork(s: &TwoInstances) -> Result<bool, Refusal> {
            enter_and_leave(&s.b(), &b(), &FORK)
        }
        race(
            RACE_ROUNDS / 10,
            || TwoInstances::new(5, 5),
            &[migrate, fork],
            |s, results| {
                assert_eq!(results, vec![Ok(true), Ok(true)], "the fork was refused");
                assert_eq!(s.totals(), (5, 5), "nothing held");
            },
        );
    }

    #[test]
    fn a_token_taken_for_a_refused_task_is_given_back() {
        let f = Fixture::new();
        let c = f.counters();
        let b = Budget {
            max_type_tasks: 1,
            rate_interval_ns: 1_000,
            rate_window_ns: 2_000,
            ..budget(10, 10, true)
        };
        let at = |now| Request { now, ..FORK };
        assert!(admit(&c, &b, &at(10_000)).counted);
        let tat = f.get(3);
        // Refused by the type's total after its token was taken: the token comes back.
        assert_eq!(admit(&c, &b, &at(10_000)).refusal, Some(Refusal::TypeTasks));
        assert_eq!(f.get(3), tat);
        let b = Budget {
            max_type_tasks: NO_LIMIT,
            ..b
        };
        assert!(
            admit(&c, &b, &at(10_000)).counted,
            "the burst's second token"
        );
        assert_eq!(admit(&c, &b, &at(10_000)).refusal, Some(Refusal::ForkRate));
    }

    #[test]
    fn an_instance_being_admitted_lets_others_through_and_then_counts_them() {
        let f = Fixture::new();
        let c = f.counters();
        let b = budget(10, 10, true);
        // Another task holds the mark: this one is let through, and changes nothing.
        f.0[0].store(OPENING);
        assert_eq!(admit(&c, &b, &FORK), Admission::contended());
        assert_eq!((f.0[0].load(), f.get(4), f.get(5)), (OPENING, 0, 0));
        // Its admitter refused for want of a slot takes the mark back.
        f.0[0].store(0);
        f.0[4].store(1);
        let full = Budget {
            max_instances: 1,
            ..b
        };
        assert_eq!(admit(&c, &full, &FORK).refusal, Some(Refusal::MaxInstances));
        assert_eq!((f.0[0].load(), f.get(4)), (0, 1));
    }

    #[test]
    fn type_and_host_budgets_name_themselves() {
        let f = Fixture::new();
        let c = f.counters();
        let b = Budget {
            max_type_tasks: 2,
            warn_type_tasks: 2,
            ..budget(10, 10, true)
        };
        assert_eq!(admit(&c, &b, &FORK).warnings, 0);
        assert_eq!(admit(&c, &b, &FORK).warnings, WARN_TYPE_TASKS);
        assert_eq!(admit(&c, &b, &FORK).refusal, Some(Refusal::TypeTasks));
        let b = Budget {
            max_host_tasks: 2,
            ..budget(10, 10, true)
        };
        assert_eq!(admit(&c, &b, &FORK).refusal, Some(Refusal::HostTasks));
        assert_eq!(
            (f.tasks(), f.get(5), f.get(6)),
            (2, 2, 2),
            "refusals give back"
        );
    }

    #[test]
    fn warnings_fire_once_on_the_way_up() {
        let f = Fixture::new();
        let c = f.counters();
        let b = Budget {
            warn_tasks: 2,
            warn_host_tasks: 3,
            ..budget(10, 10, true)
        };
        let w: Vec<u32> = (0..4).map(|_| admit(&c, &b, &FORK).warnings).collect();
        assert_eq!(w, [0, WARN_INSTANCE_TASKS, WARN_HOST_TASKS, 0]);
    }
}
