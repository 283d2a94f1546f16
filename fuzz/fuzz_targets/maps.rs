//! Any bytes as the values of the kernel maps that `status`, `gate`, `top` and `/metrics`
//! decode (the maps are read as they are: a corrupted or foreign value must not crash a
//! reader): a type's limits, live counts and per-CPU counters, an instance entry, a breaker,
//! the host budget. Through `status::type_status`, `status::instance_status`,
//! `breaker::view`, `gate::why_not` and the metrics page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spawnguard::{
    breaker, gate,
    metrics::{self, BuildInfo, DaemonView, InstanceSeries},
    status::{self, HostStatus, Status},
};
use spawnguard_common::{
    limit, BreakerLimits, BreakerState, HostLimits, HostState, InstanceState, TypeCounters,
    TypeLimits, TypeState,
};

/// Plain-old-data map values (integers and arrays of them only: any bytes are a value).
trait Value: Copy + Default {}
impl Value for BreakerLimits {}
impl Value for BreakerState {}
impl Value for HostLimits {}
impl Value for HostState {}
impl Value for InstanceState {}
impl Value for TypeCounters {}
impl Value for TypeLimits {}
impl Value for TypeState {}
impl Value for u64 {}

/// The next value from the input (zero bytes past its end), as a map lookup returns it.
fn take<T: Value>(data: &mut &[u8]) -> T {
    let mut v = T::default();
    let n = size_of::<T>().min(data.len());
    // SAFETY: T is plain old data (the `Value` types), so any bytes are a valid T; at most
    // size_of::<T>() bytes are copied into it.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), (&mut v as *mut T).cast::<u8>(), n);
    }
    *data = &data[n..];
    v
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let limits: TypeLimits = take(&mut data);
    let live: TypeState = take(&mut data);
    let cpus = (take::<u64>(&mut data) % 4 + 1) as usize;
    let per_cpu: Vec<TypeCounters> = (0..cpus).map(|_| take(&mut data)).collect();
    let mut t = status::type_status(&limits, &live, &per_cpu);
    let now: u64 = take(&mut data);
    let bstate: BreakerState = take(&mut data);
    let b = breaker::view(&t.name, &bstate, now);
    t.breaker = Some(b);
    let instance: InstanceState = take(&mut data);
    let id: u64 = take(&mut data);
    let i = status::instance_status(id, &instance, &t.name, now);
    // The breaker's limits as the loader writes them (durations at most u64::MAX >> 8 ms) and a
    // monotonic clock in ms far from wrapping: the kernel's own breaker arithmetic, which the
    // gate runs, relies on both (it wraps in the kernel, and panics here, past them).
    let now = now >> 2;
    let mut breaker_limits: BreakerLimits = take(&mut data);
    for d in [
        &mut breaker_limits.startup_window_ms,
        &mut breaker_limits.within_ms,
        &mut breaker_limits.storm_within_ms,
    ]
    .into_iter()
    .chain(breaker_limits.open_for_ms.iter_mut())
    {
        *d >>= 8;
    }
    let maps = gate::GateMaps {
        breaker_limits,
        breaker_state: bstate,
        type_limits: limits,
        type_state: live,
        host_limits: take(&mut data),
        host_state: take(&mut data),
    };
    let _ = gate::why_not(&maps, now);
    let s = Status {
        daemon_pid: None,
        backend: None,
        host: HostStatus {
            tasks: maps.host_state.tasks,
            max_tasks: limit(maps.host_limits.max_tasks),
            deny_tasks: limit(maps.host_limits.deny_tasks),
            warn_tasks: limit(maps.host_limits.warn_tasks),
        },
        types: vec![t],
        instances: vec![i],
        events_dropped: take(&mut data),
        failed_open: 0,
        failed_open_by: Default::default(),
        maps: Vec::new(),
        entries_reclaimed: 0,
        entries_settled: 0,
        released_late: 0,
        count_drift: 0,
        created_full: 0,
        releasing_full: 0,
    };
    // What `top` and `status --output json` show, and what Prometheus scrapes.
    let _ = s.types[0].denied.total();
    serde_json::to_vec(&s).expect("a status serializes");
    let mut names = spawnguard::events::Names::new(Vec::new());
    metrics::render(
        &s,
        &BuildInfo {
            backend: "kill".into(),
            kernel: "fuzz".into(),
        },
        &DaemonView::default(),
        InstanceSeries::Top(5),
        &mut names,
    )
    .expect("the metrics page renders");
});
