//! `/metrics` for Prometheus. Every value is read from the kernel maps when Prometheus scrapes
//! (per-CPU counters summed then): nothing is done in userspace per fork.
//!
//! Series per type are a fixed set (about 50), so a host's series count grows with its types,
//! not its agents. Per-instance series are opt-in and capped (`--metrics-instances top:N`):
//! 10,000 agents would otherwise make 10,000 x 3 series that change with every respawn, which
//! is what makes a Prometheus server slow and expensive.

use std::{convert::Infallible, net::SocketAddr, str::FromStr};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use spawnguard_common::BreakerPhase;
use tokio::net::TcpListener;

use crate::{
    events::Names,
    loader::PlacedType,
    status::{self, Status},
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9617";

/// Which instances get series of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceSeries {
    Off,
    /// The N instances with the most tasks.
    Top(usize),
}

/// Most instance series a scrape can carry, whatever `top:N` asks.
pub const MAX_INSTANCE_SERIES: usize = 1000;

impl FromStr for InstanceSeries {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        let n = s
            .strip_prefix("top:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("expected `off` or `top:N` (e.g. top:20), got {s:?}"))?;
        if n == 0 || n > MAX_INSTANCE_SERIES {
            return Err(format!(
                "top:{n}: N must be 1 to {MAX_INSTANCE_SERIES} (series per instance are \
                 capped so a host with many agents stays cheap to scrape)"
            ));
        }
        Ok(Self::Top(n))
    }
}

/// Where `/metrics` is served: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::At)
            .map_err(|e| format!("expected ADDRESS:PORT (e.g. 127.0.0.1:9617) or `off`: {e}"))
    }
}

/// What the scrape says about the build and the host (`spawnguard_build_info`).
#[derive(Clone, Debug)]
pub struct BuildInfo {
    pub backend: String,
    pub kernel: String,
}

/// The families of one scrape, registered as they are made.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    fn float_gauge(&self, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec> {
        let g = GaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The text exposition of one snapshot of the kernel maps.
pub fn render(
    s: &Status,
    info: &BuildInfo,
    instances: InstanceSeries,
    names: &mut Names,
) -> Result<String> {
    let m = Scrape {
        registry: Registry::new(),
    };
    m.gauge(
        "spawnguard_build_info",
        "spawnguard version, enforcement backend and kernel release (always 1).",
        &["version", "backend", "kernel"],
    )?
    .with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        info.backend.as_str(),
        info.kernel.as_str(),
    ])
    .set(1);

    let tasks = m.gauge(
        "spawnguard_tasks",
        "Live tasks (processes and threads) in the type's instances.",
        &["type"],
    )?;
    let processes = m.gauge(
        "spawnguard_processes",
        "Live processes in the type's instances.",
        &["type"],
    )?;
    let threads = m.gauge(
        "spawnguard_threads",
        "Live threads in the type's instances.",
        &["type"],
    )?;
    let live = m.gauge(
        "spawnguard_instances",
        "Admitted instances of the type (each holds one max_instances slot).",
        &["type"],
    )?;
    let ceiling = m.gauge(
        "spawnguard_instances_max",
        "The type's instance ceiling (max_instances); absent when unlimited.",
        &["type"],
    )?;
    let budget = m.gauge(
        "spawnguard_instance_budget_tasks",
        "Per-instance budgets of the type: max_tasks and max_threads.",
        &["type", "budget"],
    )?;
    let total_budget = m.gauge(
        "spawnguard_tasks_max",
        "The type's budget for all its instances together (max_total_tasks); absent when \
         unlimited.",
        &["type"],
    )?;
    let enforcing = m.gauge(
        "spawnguard_type_enforcing",
        "1 when the type's budgets are enforced, 0 in audit mode.",
        &["type"],
    )?;
    let allowed = m.counter(
        "spawnguard_spawns_allowed_total",
        "New tasks counted into the type's instances, by kind (process or thread).",
        &["type", "kind"],
    )?;
    let denied = m.counter(
        "spawnguard_denials_total",
        "New tasks and migrations stopped, by the budget that refused them.",
        &["type", "reason"],
    )?;
    let audit = m.counter(
        "spawnguard_audit_denials_total",
        "Tasks an audit-mode type would have stopped, by budget.",
        &["type", "reason"],
    )?;
    let migrations = m.counter(
        "spawnguard_migrations_total",
        "Processes moved into the type's instances, by outcome.",
        &["type", "outcome"],
    )?;
    let admitted = m.counter(
        "spawnguard_instances_admitted_total",
        "New instances admitted (first task counted).",
        &["type"],
    )?;
    let warnings = m.counter(
        "spawnguard_warnings_total",
        "Warning thresholds (warn_at) crossed.",
        &["type"],
    )?;
    let breaker = m.gauge(
        "spawnguard_breaker_state",
        "The type's circuit breaker: 1 for its current state, 0 for the others.",
        &["type", "state"],
    )?;
    let transitions = m.counter(
        "spawnguard_breaker_transitions_total",
        "Breaker transitions, by the state entered.",
        &["type", "to"],
    )?;
    let step = m.gauge(
        "spawnguard_breaker_backoff_step",
        "Index into the type's open durations used by the next opening.",
        &["type"],
    )?;
    let retry = m.float_gauge(
        "spawnguard_breaker_retry_seconds",
        "Seconds until an open breaker lets a probe through (0 when not open).",
        &["type"],
    )?;

    for t in &s.types {
        let ty = t.name.as_str();
        tasks.with_label_values(&[ty]).set(int(t.tasks));
        processes.with_label_values(&[ty]).set(int(t.processes));
        threads.with_label_values(&[ty]).set(int(t.threads));
        live.with_label_values(&[ty]).set(int(t.instances));
        if let Some(c) = t.max_instances {
            ceiling.with_label_values(&[ty]).set(int(c));
        }
        if let Some(c) = t.max_total_tasks {
            total_budget.with_label_values(&[ty]).set(int(c));
        }
        budget
            .with_label_values(&[ty, "max_tasks"])
            .set(int(t.max_tasks));
        budget
            .with_label_values(&[ty, "max_threads"])
            .set(int(t.max_threads));
        enforcing
            .with_label_values(&[ty])
            .set(i64::from(t.mode == "enforce"));
        allowed
            .with_label_values(&[ty, "process"])
            .inc_by(t.forks_allowed);
        allowed
            .with_label_values(&[ty, "thread"])
            .inc_by(t.threads_allowed);
        for (reason, n) in t.denied.by_reason() {
            denied.with_label_values(&[ty, reason]).inc_by(n);
        }
        for (reason, n) in t.audit_denied.by_reason() {
            audit.with_label_values(&[ty, reason]).inc_by(n);
        }
        migrations
            .with_label_values(&[ty, "allowed"])
            .inc_by(t.migrations_in);
        migrations
            .with_label_values(&[ty, "denied"])
            .inc_by(t.migrations_denied);
        admitted
            .with_label_values(&[ty])
            .inc_by(t.instances_admitted);
        warnings.with_label_values(&[ty]).inc_by(t.warnings);
        if let Some(b) = &t.breaker {
            for state in BreakerPhase::ALL.iter().map(|s| s.name()) {
                breaker
                    .with_label_values(&[ty, state])
                    .set(i64::from(b.state == state));
            }
            step.with_label_values(&[ty]).set(int(b.step));
            retry
                .with_label_values(&[ty])
                .set(if b.state == BreakerPhase::Open.name() {
                    b.retry_in_seconds.unwrap_or(0.0)
                } else {
                    0.0
                });
            for (to, n) in t.breaker_entered.by_state() {
                transitions.with_label_values(&[ty, to.name()]).inc_by(n);
            }
        }
    }

    m.gauge(
        "spawnguard_host_tasks",
        "Live tasks in all instances of all types.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(int(s.host.tasks));
    if let (Some(max), Some(deny)) = (s.host.max_tasks, s.host.deny_tasks) {
        let limits = m.gauge(
            "spawnguard_host_tasks_max",
            "The host budget ([host] max_tasks) and the level above which new tasks are \
             denied (max_tasks x deny_at).",
            &["limit"],
        )?;
        limits.with_label_values(&["max_tasks"]).set(int(max));
        limits.with_label_values(&["deny_above"]).set(int(deny));
    }
    m.counter(
        "spawnguard_events_dropped_total",
        "Kernel events lost because the ring buffer was full (the counters above still \
         count every decision).",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(s.events_dropped);
    m.counter(
        "spawnguard_condemned_killed_total",
        "Processes refused after they existed whose threads made no system call (so the \
         sys_exit hook could not stop them), killed by the daemon through a pidfd.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(crate::condemned::killed());
    m.counter(
        "spawnguard_instance_entries_settled_total",
        "Empty instance entries given back by the daemon's sweep, not by their last task (a \
         close that missed the emulated lock, a first task refused, processes moved out).",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(s.entries_settled);
    m.counter(
        "spawnguard_releases_settled_total",
        "Charges of exited tasks the kernel's free hook never gave back, given back later: by \
         the daemon's sweep (the task gone) or when a new task got the task's address.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .inc_by(s.released_late);
    let fail_open = m.counter(
        "spawnguard_fail_open_total",
        "New tasks let through uncounted because the kernel side could not account for them.",
        &["cause"],
    )?;
    for (cause, n) in s.failed_open_by.by_cause() {
        fail_open.with_label_values(&[cause.name()]).inc_by(n);
    }
    let entries = m.gauge(
        "spawnguard_map_entries",
        "Entries in use in the kernel's hash maps (past capacity, new entries fail open).",
        &["map"],
    )?;
    let capacity = m.gauge(
        "spawnguard_map_capacity",
        "Capacity of the kernel's hash maps.",
        &["map"],
    )?;
    for u in &s.maps {
        entries.with_label_values(&[&u.map]).set(int(u.entries));
        capacity.with_label_values(&[&u.map]).set(int(u.capacity));
    }

    if let InstanceSeries::Top(n) = instances {
        // `cgroup`, not `instance`: Prometheus gives every target an `instance` label.
        let labels = ["type", "cgroup"];
        let i_tasks = m.gauge(
            "spawnguard_instance_tasks",
            "Live tasks of one of the instances with the most tasks (--metrics-instances).",
            &labels,
        )?;
        let i_threads = m.gauge(
            "spawnguard_instance_threads",
            "Live threads of the instance.",
            &labels,
        )?;
        let i_age = m.float_gauge(
            "spawnguard_instance_age_seconds",
            "Seconds since the instance's cgroup was created.",
            &labels,
        )?;
        let mut hottest: Vec<_> = s.instances.iter().filter(|i| i.tasks > 0).collect();
        hottest.sort_by(|a, b| b.tasks.cmp(&a.tasks).then(a.id.cmp(&b.id)));
        for i in hottest.into_iter().take(n) {
            let path = names.instance(i.id);
            let l = [i.type_name.as_str(), path.as_str()];
            i_tasks.with_label_values(&l).set(int(i.tasks));
            i_threads.with_label_values(&l).set(int(i.threads));
            i_age.with_label_values(&l).set(i.age_seconds);
        }
    }

    let mut out = Vec::new();
    TextEncoder::new().encode(&m.registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// One scrape: a snapshot of the maps, rendered.
fn scrape(info: &BuildInfo, instances: InstanceSeries, types: Vec<PlacedType>) -> Result<String> {
    let s = status::snapshot()?;
    render(&s, info, instances, &mut Names::new(types))
}

/// Binds the listener now, so a taken port fails `run` at start and not later in a task.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("serving metrics on {addr} (choose another with --metrics-listen ADDR, or off)")
    })
}

/// Serves `/metrics` until the daemon stops. `types` follows the policy in force (for the
/// instance paths of per-instance series).
pub async fn serve(
    listener: TcpListener,
    info: BuildInfo,
    instances: InstanceSeries,
    types: tokio::sync::watch::Receiver<Vec<PlacedType>>,
) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let info = info.clone();
        let types = types.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let info = info.clone();
                let types = types.borrow().clone();
                async move { Ok::<_, Infallible>(answer(req, info, instances, types).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    info: BuildInfo,
    instances: InstanceSeries,
    types: Vec<PlacedType>,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            // Reading the maps is a few syscalls per map: off the async thread.
            let rendered =
                tokio::task::spawn_blocking(move || scrape(&info, instances, types)).await;
            match rendered {
                Ok(Ok(text)) => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                ),
                Ok(Err(e)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("reading the kernel maps: {e:#}\n"),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            }
        }
        (&hyper::Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain",
            "spawnguard: metrics are at /metrics\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    /// Checks a metric name the way Prometheus does (used by the tests on every family).
    fn valid_metric_name(name: &str) -> Result<()> {
        let ok = name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
        if !ok || name.is_empty() {
            bail!("invalid metric name {name:?}");
        }
        Ok(())
    }

    #[test]
    fn instance_series_are_off_or_a_bounded_top() {
        assert_eq!("off".parse(), Ok(InstanceSeries::Off));
        assert_eq!("top:20".parse(), Ok(InstanceSeries::Top(20)));
        for bad in ["top:0", "top:1001", "top", "all", "top:-1", "20"] {
            assert!(bad.parse::<InstanceSeries>().is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_is_an_address_or_off() {
        assert_eq!("off".parse(), Ok(Listen::Off));
        assert_eq!(
            "127.0.0.1:9617".parse(),
            Ok(Listen::At("127.0.0.1:9617".parse().unwrap()))
        );
        assert!("localhost".parse::<Listen>().is_err());
    }

    #[test]
    fn an_empty_snapshot_renders_valid_families() {
        let s = Status {
            daemon_pid: None,
            backend: None,
            host: status::HostStatus {
                tasks: 0,
                max_tasks: Some(100),
                deny_tasks: Some(90),
            },
            types: vec![],
            instances: vec![],
            events_dropped: 3,
            failed_open: 0,
            failed_open_by: Default::default(),
            maps: vec![],
            entries_reclaimed: 0,
            entries_settled: 0,
            released_late: 0,
            count_drift: 0,
            created_full: 0,
            releasing_full: 0,
        };
        let info = BuildInfo {
            backend: "kill".into(),
            kernel: "6.18".into(),
        };
        let text = render(&s, &info, InstanceSeries::Top(5), &mut Names::new(vec![])).unwrap();
        assert!(
            text.contains("spawnguard_events_dropped_total 3\n"),
            "{text}"
        );
        assert!(text.contains("spawnguard_host_tasks_max{limit=\"deny_above\"} 90\n"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            valid_metric_name(line.split(' ').nth(2).unwrap()).unwrap();
        }
    }
}
