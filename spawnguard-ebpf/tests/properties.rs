//! Property tests of the decision functions (issue 19): the same functions the eBPF programs
//! run, on the host, against a model written from the rules they promise.
//!
//! - Admission: for random budgets and random interleavings of forks, threads (admitted or
//!   refused) and exits across instances of a type, every count equals the model's, none
//!   passes its budget or goes below zero, and all return to zero when everything has left.
//! - Breaker: for any sequence of gate checks, instance ends, abandoned probes and denials at
//!   any clock values, each transition and each verdict is the state machine's.

use proptest::prelude::*;
use spawnguard_ebpf::*;

const INSTANCES: usize = 3;

/// One step of the admission interleaving.
#[derive(Clone, Debug)]
enum Op {
    /// A new process (`thread` false) or thread in instance `i`, at time `dt` ns after the
    /// previous step.
    Enter { i: usize, thread: bool, dt: u64 },
    /// The `k`-th live task (modulo how many there are) exits.
    Leave { k: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..INSTANCES, any::<bool>(), 0u64..2_000_000)
            .prop_map(|(i, thread, dt)| Op::Enter { i, thread, dt }),
        2 => any::<usize>().prop_map(|k| Op::Leave { k }),
    ]
}

/// A limit from 0 to 6, or none.
fn limit() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..7, 1 => Just(Budget::UNLIMITED)]
}

fn budget() -> impl Strategy<Value = Budget> {
    (
        (limit(), limit(), limit(), limit(), limit()),
        prop_oneof![Just(0u64), 100_000u64..1_000_000],
        1u64..4,
    )
        .prop_map(
            |((tasks, threads, instances, type_tasks, host), interval, burst)| Budget {
                max_tasks: tasks,
                max_threads: threads,
                rate_interval_ns: interval,
                rate_window_ns: interval * burst,
                max_instances: instances,
                max_type_tasks: type_tasks,
                max_host_tasks: host,
                warn_tasks: Budget::UNLIMITED,
                warn_type_tasks: Budget::UNLIMITED,
                warn_host_tasks: Budget::UNLIMITED,
                rate_gen: 0,
                enforce: true,
            },
        )
}

/// Per-instance counters, and the type's and host's shared ones.
struct World {
    instance: [AtomicU64; INSTANCES],
    processes: [AtomicU64; INSTANCES],
    threads: [AtomicU64; INSTANCES],
    rate: [AtomicU64; INSTANCES],
    type_instances: AtomicU64,
    type_tasks: AtomicU64,
    host_tasks: AtomicU64,
}

impl World {
    fn new() -> Self {
        let zeros = || core::array::from_fn(|_| AtomicU64::new(0));
        Self {
            instance: zeros(),
            processes: zeros(),
            threads: zeros(),
            rate: zeros(),
            type_instances: AtomicU64::new(0),
            type_tasks: AtomicU64::new(0),
            host_tasks: AtomicU64::new(0),
        }
    }

    fn counters(&self, i: usize) -> Counters<'_> {
        Counters {
            instance: &self.instance[i],
            processes: &self.processes[i],
            threads: &self.threads[i],
            rate_tat: &self.rate[i],
            type_instances: &self.type_instances,
            type_tasks: &self.type_tasks,
            host_tasks: &self.host_tasks,
        }
    }
}

/// Every count equals the model's (`live`: instance and kind of each live task), and none is
/// past its budget. A count gone below zero would wrap to a huge value and fail both.
fn check(w: &World, b: &Budget, live: &[(usize, bool)]) -> Result<(), TestCaseError> {
    let mut open = 0;
    for i in 0..INSTANCES {
        let tasks = live.iter().filter(|t| t.0 == i).count() as u64;
        let threads = live.iter().filter(|t| t.0 == i && t.1).count() as u64;
        let word = w.instance[i].load();
        prop_assert_eq!(word_tasks(word), tasks, "instance {} tasks", i);
        // Admitted exactly while it has tasks; no transient flag left behind.
        let admitted = if tasks > 0 { ADMITTED } else { 0 };
        prop_assert_eq!(word & !TASKS_MASK, admitted, "instance {} flags", i);
        prop_assert_eq!(w.threads[i].load(), threads, "instance {} threads", i);
        prop_assert_eq!(
            w.processes[i].load(),
            tasks - threads,
            "instance {} processes",
            i
        );
        prop_assert!(tasks <= b.max_tasks && threads <= b.max_threads);
        open += u64::from(tasks > 0);
    }
    let total = live.len() as u64;
    prop_assert_eq!(w.type_instances.load(), open);
    prop_assert_eq!(w.type_tasks.load(), total);
    prop_assert_eq!(w.host_tasks.load(), total);
    prop_assert!(open <= b.max_instances);
    prop_assert!(total <= b.max_type_tasks && total <= b.max_host_tasks);
    Ok(())
}

proptest! {
    #[test]
    fn counts_follow_admissions_and_exits_within_budget(
        b in budget(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let w = World::new();
        let mut live: Vec<(usize, bool)> = Vec::new();
        let mut now = 1_000_000_000u64;
        for op in ops {
            match op {
                Op::Enter { i, thread, dt } => {
                    now += dt;
                    let r = if thread { Request::thread(now) } else { Request::fork(now) };
                    let a = admit(&w.counters(i), &b, &r);
                    prop_assert!(!a.contended && !a.rate_contended, "alone, nothing contends");
                    // Enforced: counted exactly when not refused.
                    prop_assert_eq!(a.counted, a.refusal.is_none());
                    if a.counted {
                        live.push((i, thread));
                    }
                }
                Op::Leave { k } => {
                    if live.is_empty() {
                        continue;
                    }
                    let (i, thread) = live.remove(k % live.len());
                    let left = release_tasks(
                        &w.counters(i),
                        1,
                        u64::from(thread),
                        u64::from(!thread),
                    );
                    prop_assert!(!left.drift);
                    prop_assert_eq!(left.closed, !live.iter().any(|t| t.0 == i));
                }
            }
            check(&w, &b, &live)?;
        }
        // Everything leaves: every count is back to zero.
        while let Some((i, thread)) = live.pop() {
            release_tasks(&w.counters(i), 1, u64::from(thread), u64::from(!thread));
        }
        check(&w, &b, &live)?;
    }
}

// The breaker's state machine, written as the model.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed,
    Open { step: u64, until: u64 },
    Probing { step: u64, until: u64 },
}

#[derive(Clone, Debug)]
enum Event {
    Gate { now: u64 },
    Ended { now: u64, lived: u64, probe: bool },
    Abandon { now: u64 },
    Denial { now: u64 },
}

fn event() -> impl Strategy<Value = Event> {
    // Clock values in a range where deadlines meet them often.
    let now = 0u64..20_000;
    prop_oneof![
        3 => now.clone().prop_map(|now| Event::Gate { now }),
        3 => (now.clone(), 0u64..300, any::<bool>())
            .prop_map(|(now, lived, probe)| Event::Ended { now, lived, probe }),
        1 => now.clone().prop_map(|now| Event::Abandon { now }),
        2 => now.prop_map(|now| Event::Denial { now }),
    ]
}

fn breaker_policy() -> impl Strategy<Value = BreakerPolicy> {
    (
        any::<bool>(),
        0u64..200,
        1u64..=FAILURE_RING as u64,
        0u64..2_000,
        proptest::collection::vec(0u64..5_000, BREAKER_STEPS),
        0u64..=BREAKER_STEPS as u64,
        0u64..5,
        0u64..500,
    )
        .prop_map(
            |(enabled, window, failures, within, open, steps, storm, storm_within)| {
                let mut open_for_ms = [0; BREAKER_STEPS];
                open_for_ms.copy_from_slice(&open);
                BreakerPolicy {
                    enabled: u32::from(enabled),
                    _pad: 0,
                    startup_window_ms: window,
                    failures,
                    within_ms: within,
                    open_for_ms,
                    steps,
                    storm_denials: storm,
                    storm_within_ms: storm_within,
                }
            },
        )
}

/// The model: the state, the start-up failures seen (in order) and the deny-storm window.
struct Model {
    state: State,
    failures: Vec<u64>,
    storm_start: u64,
    storm_count: u64,
}

impl Model {
    fn open_for(p: &BreakerPolicy, step: u64) -> u64 {
        // The last configured duration repeats.
        let last = p.steps.max(1) - 1;
        p.open_for_ms[step.min(last) as usize]
    }

    fn step(&self) -> u64 {
        match self.state {
            State::Closed => 0,
            State::Open { step, .. } | State::Probing { step, .. } => step,
        }
    }

    fn phase(s: State) -> u64 {
        match s {
            State::Closed => BREAKER_CLOSED,
            State::Open { .. } => BREAKER_OPEN,
            State::Probing { .. } => BREAKER_PROBING,
        }
    }

    fn go(&mut self, to: State, cause: Cause) -> Option<Transition> {
        let t = Transition {
            from: Self::phase(self.state),
            to: Self::phase(to),
            cause,
            until_ms: match to {
                State::Closed => 0,
                State::Open { until, .. } | State::Probing { until, .. } => until,
            },
        };
        self.state = to;
        Some(t)
    }

    fn open(&mut self, p: &BreakerPolicy, step: u64, now: u64, cause: Cause) -> Option<Transition> {
        let step = step.min(0x3f);
        let until = now + Self::open_for(p, step);
        self.go(State::Open { step, until }, cause)
    }

    fn gate(&mut self, p: &BreakerPolicy, now: u64) -> (Gate, Option<Transition>) {
        match self.state {
            _ if p.enabled == 0 => (Gate::Pass, None),
            State::Closed => (Gate::Pass, None),
            State::Open { until, .. } | State::Probing { until, .. } if now < until => (
                Gate::Refused {
                    until_ms: until,
                    probing: matches!(self.state, State::Probing { .. }),
                },
                None,
            ),
            State::Open { step, .. } => {
                let until = now + p.startup_window_ms;
                (
                    Gate::Probe,
                    self.go(State::Probing { step, until }, Cause::ProbeAdmitted),
                )
            }
            State::Probing { .. } => (Gate::Pass, self.go(State::Closed, Cause::ProbeHealthy)),
        }
    }

    fn ended(
        &mut self,
        p: &BreakerPolicy,
        now: u64,
        lived: u64,
        probe: bool,
    ) -> Option<Transition> {
        if p.enabled == 0 {
            return None;
        }
        let failed = lived < p.startup_window_ms;
        if let (true, State::Probing { step, .. }) = (probe, self.state) {
            return if failed {
                self.open(p, step + 1, now, Cause::ProbeFailed)
            } else {
                self.go(State::Closed, Cause::ProbeHealthy)
            };
        }
        if !failed {
            return None;
        }
        self.failures.push(now);
        // `failures` start-up failures, the oldest of them within `within` of this one.
        let n = p.failures as usize;
        let tripped = n <= 1
            || (self.failures.len() >= n
                && now.saturating_sub(self.failures[self.failures.len() - n]) <= p.within_ms);
        if tripped && self.state == State::Closed {
            return self.open(p, self.step(), now, Cause::Failures);
        }
        None
    }

    fn abandon(&mut self, now: u64) -> Option<Transition> {
        match self.state {
            State::Probing { step, .. } => {
                self.go(State::Open { step, until: now }, Cause::ProbeAbandoned)
            }
            _ => None,
        }
    }

    fn denial(&mut self, p: &BreakerPolicy, now: u64) -> Option<Transition> {
        if p.enabled == 0 || p.storm_denials == 0 {
            return None;
        }
        // A window of `storm_within` from its first denial; a later one starts a new window.
        if now.saturating_sub(self.storm_start) > p.storm_within_ms {
            self.storm_start = now;
            self.storm_count = 1;
        } else {
            self.storm_count += 1;
        }
        if self.storm_count >= p.storm_denials && self.state == State::Closed {
            return self.open(p, self.step(), now, Cause::DenyStorm);
        }
        None
    }

    fn word(&self) -> u64 {
        match self.state {
            State::Closed => breaker_word(BREAKER_CLOSED, 0, 0),
            State::Open { step, until } => breaker_word(BREAKER_OPEN, step, until),
            State::Probing { step, until } => breaker_word(BREAKER_PROBING, step, until),
        }
    }
}

proptest! {
    #[test]
    fn the_breaker_follows_its_state_machine(
        p in breaker_policy(),
        events in proptest::collection::vec(event(), 1..100),
    ) {
        let word = AtomicU64::new(0);
        let ring: [AtomicU64; FAILURE_RING] = core::array::from_fn(|_| AtomicU64::new(0));
        let next = AtomicU64::new(0);
        let (storm_start, storm_count) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut m = Model { state: State::Closed, failures: Vec::new(), storm_start: 0, storm_count: 0 };
        for e in events {
            match e {
                Event::Gate { now } => {
                    prop_assert_eq!(breaker_gate(&word, now, &p), m.gate(&p, now), "{:?}", e);
                }
                Event::Ended { now, lived, probe } => {
                    let got = breaker_instance_ended(&word, &ring, &next, now, lived, probe, &p);
                    prop_assert_eq!(got, m.ended(&p, now, lived, probe), "{:?}", e);
                }
                Event::Abandon { now } => {
                    prop_assert_eq!(breaker_abandon_probe(&word, now), m.abandon(now), "{:?}", e);
                }
                Event::Denial { now } => {
                    let got = breaker_denial(&word, &storm_start, &storm_count, now, &p);
                    prop_assert_eq!(got, m.denial(&p, now), "{:?}", e);
                }
            }
            prop_assert_eq!(word.load(), m.word(), "after {:?}", e);
        }
    }
}
