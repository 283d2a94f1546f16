//! `/metrics` for Prometheus. Every value is read from the kernel maps when Prometheus scrapes
//! (per-CPU counters summed then): nothing is done in userspace per fork.
//!
//! Series per type are a fixed set (about 50), so a host's series count grows with its types,
//! not its agents. Per-instance series are opt-in and capped (`--metrics-instances top:N`):
//! 10,000 agents would otherwise make 10,000 x 3 series that change with every respawn, which
//! is what makes a Prometheus server slow and expensive.

use std::{convert::Infallible, net::SocketAddr, str::FromStr, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use spawnguard_common::BreakerPhase;
use tokio::net::TcpListener;

use crate::{
    events::Names,
    health::Health,
    loader::PlacedType,
    reload,
    status::{self, InstanceStatus, Status, TypeStatus},
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
        // An IPv6 address without brackets too: Kubernetes' `$(HOST_IP):9617` on an IPv6 node.
        let unbracketed = || {
            let (ip, port) = s.rsplit_once(':')?;
            Some(SocketAddr::new(
                ip.parse::<std::net::Ipv6Addr>().ok()?.into(),
                port.parse().ok()?,
            ))
        };
        s.parse()
            .or_else(|e| unbracketed().ok_or(e))
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

/// Where a family's samples come from, for one row of the scrape (the daemon, a type, an
/// instance). The variant is the family's Prometheus type. A row gives each sample as the
/// label values after the row's own (a type row's own label is `type`) and a value.
enum Samples<T> {
    Gauge(fn(&T, Sink<'_, u64>)),
    FloatGauge(fn(&T, Sink<'_, f64>)),
    Counter(fn(&T, Sink<'_, u64>)),
}

/// Takes a row's samples: label values (after the row's own) and a value.
type Sink<'a, V> = &'a mut dyn FnMut(&[&str], V);

/// One metric family: its name, help and label names, and its samples from a row.
struct Family<T> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    samples: Samples<T>,
}

/// A row of the scrape: its own label values, and what its samples are read from.
type Row<'a, T> = (Vec<&'a str>, &'a T);

/// The families of one scrape, registered as they are made.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// Registers `family` with the samples of every row (none: it is left out of the text).
    fn add<T>(&self, family: &Family<T>, rows: &[Row<T>]) -> Result<()> {
        let opts = Opts::new(family.name, family.help);
        match family.samples {
            Samples::Gauge(samples) => {
                let g = IntGaugeVec::new(opts, family.labels)?;
                self.registry.register(Box::new(g.clone()))?;
                for (own, row) in rows {
                    samples(row, &mut |rest, v| {
                        g.with_label_values(&labels(own, rest)).set(int(v));
                    });
                }
            }
            Samples::FloatGauge(samples) => {
                let g = GaugeVec::new(opts, family.labels)?;
                self.registry.register(Box::new(g.clone()))?;
                for (own, row) in rows {
                    samples(row, &mut |rest, v| {
                        g.with_label_values(&labels(own, rest)).set(v)
                    });
                }
            }
            Samples::Counter(samples) => {
                let c = IntCounterVec::new(opts, family.labels)?;
                self.registry.register(Box::new(c.clone()))?;
                for (own, row) in rows {
                    samples(row, &mut |rest, n| {
                        c.with_label_values(&labels(own, rest)).inc_by(n);
                    });
                }
            }
        }
        Ok(())
    }

    fn add_all<T>(&self, families: &[Family<T>], rows: &[Row<T>]) -> Result<()> {
        families.iter().try_for_each(|f| self.add(f, rows))
    }
}

/// A row's own label values, then a sample's.
fn labels<'a>(own: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    own.iter().chain(rest).copied().collect()
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const BUILD_INFO: Family<BuildInfo> = Family {
    name: "spawnguard_build_info",
    help: "spawnguard version, enforcement backend and kernel release (always 1).",
    labels: &["version", "backend", "kernel"],
    samples: Samples::Gauge(|b, out| {
        out(
            &[
                env!("CARGO_PKG_VERSION"),
                b.backend.as_str(),
                b.kernel.as_str(),
            ],
            1,
        )
    }),
};

/// What the daemon itself knows: readiness and policy reloads.
#[derive(Clone, Debug, Default)]
pub struct DaemonView {
    pub ready: bool,
    pub reload: reload::Stats,
}

const DAEMON_FAMILIES: &[Family<DaemonView>] = &[
    Family {
        name: "spawnguard_enforcer_ready",
        help: "1 when the enforcer is attached and the policy in force (as /readyz), else 0.",
        labels: &[],
        samples: Samples::Gauge(|d, out| out(&[], u64::from(d.ready))),
    },
    Family {
        name: "spawnguard_policy_info",
        help: "The policy in force: the first 16 hex digits of its text's SHA-256 (always 1).",
        labels: &["hash"],
        samples: Samples::Gauge(|d, out| {
            if !d.reload.hash.is_empty() {
                out(&[d.reload.hash.as_str()], 1);
            }
        }),
    },
    Family {
        name: "spawnguard_policy_last_reload_successful",
        help: "1 when the last policy reload (file watch, SIGHUP or `policy apply`) put its \
               policy in force, 0 when it failed and the previous policy stayed.",
        labels: &[],
        samples: Samples::Gauge(|d, out| out(&[], u64::from(d.reload.last_successful))),
    },
    Family {
        name: "spawnguard_policy_last_reload_success_timestamp_seconds",
        help: "Unix time of the last successful policy load (the daemon's start, or a reload).",
        labels: &[],
        samples: Samples::FloatGauge(|d, out| out(&[], d.reload.last_success_unix)),
    },
    Family {
        name: "spawnguard_policy_reloads_total",
        help: "Policy reloads (file watch, SIGHUP, `policy apply`), by result.",
        labels: &["result"],
        samples: Samples::Counter(|d, out| {
            out(&["success"], d.reload.successes);
            out(&["failure"], d.reload.failures);
        }),
    },
];

/// How much each type runs, and its budgets.
const TYPE_SIZE_FAMILIES: &[Family<TypeStatus>] = &[
    Family {
        name: "spawnguard_tasks",
        help: "Live tasks (processes and threads) in the type's instances.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| out(&[], t.tasks)),
    },
    Family {
        name: "spawnguard_processes",
        help: "Live processes in the type's instances.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| out(&[], t.processes)),
    },
    Family {
        name: "spawnguard_threads",
        help: "Live threads in the type's instances.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| out(&[], t.threads)),
    },
    Family {
        name: "spawnguard_instances",
        help: "Admitted instances of the type (each holds one max_instances slot).",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| out(&[], t.instances)),
    },
    Family {
        name: "spawnguard_instances_max",
        help: "The type's instance ceiling (max_instances); absent when unlimited.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| {
            if let Some(c) = t.max_instances {
                out(&[], c);
            }
        }),
    },
    Family {
        name: "spawnguard_instance_budget_tasks",
        help: "Per-instance budgets of the type: max_tasks and max_threads.",
        labels: &["type", "budget"],
        samples: Samples::Gauge(|t, out| {
            out(&["max_tasks"], t.max_tasks);
            out(&["max_threads"], t.max_threads);
        }),
    },
    Family {
        name: "spawnguard_tasks_max",
        help: "The type's budget for all its instances together (max_total_tasks); absent when \
               unlimited.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| {
            if let Some(c) = t.max_total_tasks {
                out(&[], c);
            }
        }),
    },
    Family {
        name: "spawnguard_warn_threshold",
        help: "Usage at which the type's warning fires (warn_at of the budget), by budget: \
               max_tasks (per instance), max_total_tasks, max_instances (absent when unlimited).",
        labels: &["type", "budget"],
        samples: Samples::Gauge(|t, out| {
            out(&["max_tasks"], t.warn_tasks);
            if let Some(w) = t.warn_total_tasks {
                out(&["max_total_tasks"], w);
            }
            if let Some(w) = t.warn_instances {
                out(&["max_instances"], w);
            }
        }),
    },
    Family {
        name: "spawnguard_type_enforcing",
        help: "1 when the type's budgets are enforced, 0 in audit mode.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| out(&[], u64::from(t.mode == "enforce"))),
    },
];

/// What the kernel decided for each type's new tasks, migrations and instances.
const TYPE_DECISION_FAMILIES: &[Family<TypeStatus>] = &[
    Family {
        name: "spawnguard_spawns_allowed_total",
        help: "New tasks counted into the type's instances, by kind (process or thread).",
        labels: &["type", "kind"],
        samples: Samples::Counter(|t, out| {
            out(&["process"], t.forks_allowed);
            out(&["thread"], t.threads_allowed);
        }),
    },
    Family {
        name: "spawnguard_denials_total",
        help: "New tasks and migrations stopped, by the budget that refused them.",
        labels: &["type", "reason"],
        samples: Samples::Counter(|t, out| {
            for (reason, n) in t.denied.by_reason() {
                out(&[reason], n);
            }
        }),
    },
    Family {
        name: "spawnguard_audit_denials_total",
        help: "Tasks an audit-mode type would have stopped, by budget.",
        labels: &["type", "reason"],
        samples: Samples::Counter(|t, out| {
            for (reason, n) in t.audit_denied.by_reason() {
                out(&[reason], n);
            }
        }),
    },
    Family {
        name: "spawnguard_migrations_total",
        help: "Processes moved into the type's instances, by outcome.",
        labels: &["type", "outcome"],
        samples: Samples::Counter(|t, out| {
            out(&["allowed"], t.migrations_in);
            out(&["denied"], t.migrations_denied);
        }),
    },
    Family {
        name: "spawnguard_instances_admitted_total",
        help: "New instances admitted (first task counted).",
        labels: &["type"],
        samples: Samples::Counter(|t, out| out(&[], t.instances_admitted)),
    },
    Family {
        name: "spawnguard_warnings_total",
        help: "Warning thresholds (warn_at) crossed.",
        labels: &["type"],
        samples: Samples::Counter(|t, out| out(&[], t.warnings)),
    },
];

/// The circuit breaker of each type that has one.
const BREAKER_FAMILIES: &[Family<TypeStatus>] = &[
    Family {
        name: "spawnguard_breaker_state",
        help: "The type's circuit breaker: 1 for its current state, 0 for the others.",
        labels: &["type", "state"],
        samples: Samples::Gauge(|t, out| {
            if let Some(b) = &t.breaker {
                for state in BreakerPhase::ALL.iter().map(|s| s.name()) {
                    out(&[state], u64::from(b.state == state));
                }
            }
        }),
    },
    Family {
        name: "spawnguard_breaker_transitions_total",
        help: "Breaker transitions, by the state entered.",
        labels: &["type", "to"],
        samples: Samples::Counter(|t, out| {
            if t.breaker.is_some() {
                for (to, n) in t.breaker_entered.by_state() {
                    out(&[to.name()], n);
                }
            }
        }),
    },
    Family {
        name: "spawnguard_breaker_backoff_step",
        help: "Index into the type's open durations used by the next opening.",
        labels: &["type"],
        samples: Samples::Gauge(|t, out| {
            if let Some(b) = &t.breaker {
                out(&[], b.step);
            }
        }),
    },
    Family {
        name: "spawnguard_breaker_retry_seconds",
        help: "Seconds until an open breaker lets a probe through (0 when not open).",
        labels: &["type"],
        samples: Samples::FloatGauge(|t, out| {
            if let Some(b) = &t.breaker {
                let open = b.state == BreakerPhase::Open.name();
                out(
                    &[],
                    if open {
                        b.retry_in_seconds.unwrap_or(0.0)
                    } else {
                        0.0
                    },
                );
            }
        }),
    },
    Family {
        name: "spawnguard_breaker_open_since_timestamp_seconds",
        help: "Unix time at which the type's breaker opened (0 when it is not open).",
        labels: &["type"],
        samples: Samples::FloatGauge(|t, out| {
            if let Some(b) = &t.breaker {
                out(&[], b.open_since_unix_seconds.unwrap_or(0.0));
            }
        }),
    },
    Family {
        name: "spawnguard_breaker_open_duration_seconds",
        help: "How long the type's breaker's current opening lasts (its backoff step's open \
               time, or a manual open's), 0 when it is not open: open longer than this, it \
               waits for a probe instance.",
        labels: &["type"],
        samples: Samples::FloatGauge(|t, out| {
            if let Some(b) = &t.breaker {
                out(&[], b.open_for_seconds.unwrap_or(0.0));
            }
        }),
    },
];

/// The host and the kernel side as a whole.
const HOST_FAMILIES: &[Family<Status>] = &[
    Family {
        name: "spawnguard_host_tasks",
        help: "Live tasks in all instances of all types.",
        labels: &[],
        samples: Samples::Gauge(|s, out| out(&[], s.host.tasks)),
    },
    Family {
        name: "spawnguard_host_tasks_max",
        help: "The host budget ([host] max_tasks), the level above which new tasks are \
               denied (max_tasks x deny_at), and the level at which a warning fires \
               (max_tasks x warn_at).",
        labels: &["limit"],
        samples: Samples::Gauge(|s, out| {
            if let (Some(max), Some(deny)) = (s.host.max_tasks, s.host.deny_tasks) {
                out(&["max_tasks"], max);
                out(&["deny_above"], deny);
            }
            if let Some(warn) = s.host.warn_tasks {
                out(&["warn_at"], warn);
            }
        }),
    },
    Family {
        name: "spawnguard_events_dropped_total",
        help: "Kernel events lost because the ring buffer was full (the counters above still \
               count every decision).",
        labels: &[],
        samples: Samples::Counter(|s, out| out(&[], s.events_dropped)),
    },
    Family {
        name: "spawnguard_condemned_killed_total",
        help: "Processes refused after they existed whose threads made no system call (so the \
               sys_exit hook could not stop them), killed by the daemon through a pidfd.",
        labels: &[],
        // Counted by this daemon, not in the maps.
        samples: Samples::Counter(|_, out| out(&[], crate::condemned::killed())),
    },
    Family {
        name: "spawnguard_instance_entries_settled_total",
        help: "Empty instance entries given back by the daemon's sweep, not by their last task \
               (a close that missed the emulated lock, a first task refused, processes moved \
               out).",
        labels: &[],
        samples: Samples::Counter(|s, out| out(&[], s.entries_settled)),
    },
    Family {
        name: "spawnguard_releases_settled_total",
        help: "Charges of exited tasks the kernel's free hook never gave back, given back later: \
               by the daemon's sweep (the task gone) or when a new task got the task's address.",
        labels: &[],
        samples: Samples::Counter(|s, out| out(&[], s.released_late)),
    },
    Family {
        name: "spawnguard_fail_open_total",
        help: "New tasks let through uncounted because the kernel side could not account for \
               them.",
        labels: &["cause"],
        samples: Samples::Counter(|s, out| {
            for (cause, n) in s.failed_open_by.by_cause() {
                out(&[cause.name()], n);
            }
        }),
    },
    Family {
        name: "spawnguard_map_entries",
        help: "Entries in use in the kernel's hash maps (past capacity, new entries fail open).",
        labels: &["map"],
        samples: Samples::Gauge(|s, out| {
            for u in &s.maps {
                out(&[u.map.as_str()], u.entries);
            }
        }),
    },
    Family {
        name: "spawnguard_map_capacity",
        help: "Capacity of the kernel's hash maps.",
        labels: &["map"],
        samples: Samples::Gauge(|s, out| {
            for u in &s.maps {
                out(&[u.map.as_str()], u.capacity);
            }
        }),
    },
];

/// The instances `--metrics-instances` shows. Their label is `cgroup`, not `instance`:
/// Prometheus gives every target an `instance` label.
const INSTANCE_FAMILIES: &[Family<InstanceStatus>] = &[
    Family {
        name: "spawnguard_instance_tasks",
        help: "Live tasks of one of the instances with the most tasks (--metrics-instances).",
        labels: &["type", "cgroup"],
        samples: Samples::Gauge(|i, out| out(&[], i.tasks)),
    },
    Family {
        name: "spawnguard_instance_threads",
        help: "Live threads of the instance.",
        labels: &["type", "cgroup"],
        samples: Samples::Gauge(|i, out| out(&[], i.threads)),
    },
    Family {
        name: "spawnguard_instance_age_seconds",
        help: "Seconds since the instance's cgroup was created.",
        labels: &["type", "cgroup"],
        samples: Samples::FloatGauge(|i, out| out(&[], i.age_seconds)),
    },
];

/// The `n` instances with the most tasks (empty ones never), ties by cgroup id.
fn hottest(s: &Status, n: usize) -> Vec<&InstanceStatus> {
    let mut hottest: Vec<_> = s.instances.iter().filter(|i| i.tasks > 0).collect();
    hottest.sort_by(|a, b| b.tasks.cmp(&a.tasks).then(a.id.cmp(&b.id)));
    hottest.truncate(n);
    hottest
}

/// The text exposition of one snapshot of the kernel maps.
pub fn render(
    s: &Status,
    info: &BuildInfo,
    daemon: &DaemonView,
    instances: InstanceSeries,
    names: &mut Names,
) -> Result<String> {
    let m = Scrape {
        registry: Registry::new(),
    };
    m.add(&BUILD_INFO, &[(vec![], info)])?;
    m.add_all(DAEMON_FAMILIES, &[(vec![], daemon)])?;
    m.add_all(HOST_FAMILIES, &[(vec![], s)])?;
    let types: Vec<Row<TypeStatus>> = s.types.iter().map(|t| (vec![t.name.as_str()], t)).collect();
    for families in [TYPE_SIZE_FAMILIES, TYPE_DECISION_FAMILIES, BREAKER_FAMILIES] {
        m.add_all(families, &types)?;
    }
    if let InstanceSeries::Top(n) = instances {
        let shown = hottest(s, n);
        let paths: Vec<String> = shown.iter().map(|i| names.instance(i.id)).collect();
        let rows: Vec<Row<InstanceStatus>> = shown
            .iter()
            .zip(&paths)
            .map(|(i, path)| (vec![i.type_name.as_str(), path.as_str()], *i))
            .collect();
        m.add_all(INSTANCE_FAMILIES, &rows)?;
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&m.registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// One scrape: a snapshot of the maps, rendered.
fn scrape(
    info: &BuildInfo,
    daemon: &DaemonView,
    instances: InstanceSeries,
    types: Vec<PlacedType>,
) -> Result<String> {
    let s = status::snapshot()?;
    render(&s, info, daemon, instances, &mut Names::new(types))
}

/// Binds the listener now, so a taken port fails `run` at start and not later in a task.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("serving metrics on {addr} (choose another with --metrics-listen ADDR, or off)")
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the daemon stops. `types` follows the
/// policy in force (for the instance paths of per-instance series).
pub async fn serve(
    listener: TcpListener,
    info: BuildInfo,
    instances: InstanceSeries,
    types: tokio::sync::watch::Receiver<Vec<PlacedType>>,
    health: Arc<Health>,
) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let info = info.clone();
        let types = types.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let info = info.clone();
                let types = types.borrow().clone();
                let health = health.clone();
                async move { Ok::<_, Infallible>(answer(req, info, instances, types, &health).await) }
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
    health: &Health,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    let probe = |verdict: Result<(), String>| match verdict {
        Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        Err(why) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{why}\n"),
        ),
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/healthz") => probe(health.alive()),
        (&hyper::Method::GET, "/readyz") => probe(health.ready()),
        (&hyper::Method::GET, "/metrics") => {
            let daemon = DaemonView {
                ready: health.ready().is_ok(),
                reload: reload::stats(),
            };
            // Reading the maps is a few syscalls per map: off the async thread.
            let rendered =
                tokio::task::spawn_blocking(move || scrape(&info, &daemon, instances, types)).await;
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
            "spawnguard: metrics are at /metrics; probes at /healthz and /readyz\n".into(),
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
        // `$(HOST_IP):9617` with an IPv6 node address, bracketed or not.
        let v6 = Ok(Listen::At("[fd00::1]:9617".parse().unwrap()));
        assert_eq!("fd00::1:9617".parse(), v6);
        assert_eq!("[fd00::1]:9617".parse(), v6);
        assert!("fd00::1".parse::<Listen>().is_err());
        assert!("10.0.0.1".parse::<Listen>().is_err());
    }

    /// One type with an open breaker and one instance: every per-type family, in the text
    /// Prometheus gets (families by name, samples by label values).
    const SNAPSHOT: &str = r#"{
        "daemon_pid": null, "backend": null,
        "host": {"tasks": 12, "max_tasks": 100, "deny_tasks": 90, "warn_tasks": 70},
        "types": [{
            "name": "ci", "mode": "enforce", "max_tasks": 64, "max_threads": 48,
            "max_instances": 4, "max_total_tasks": null, "warn_tasks": 45,
            "warn_total_tasks": null, "warn_instances": 3, "instances": 2, "tasks": 12,
            "processes": 9, "threads": 3, "forks_allowed": 40, "threads_allowed": 7,
            "migrations_in": 1, "migrations_denied": 2, "instances_admitted": 5, "warnings": 1,
            "breaker_entered": {"closed": 0, "open": 1, "half_open": 0},
            "denied": {"max_tasks": 3, "max_threads": 0, "fork_rate": 0, "max_instances": 1,
                "max_total_tasks": 0, "host_max_tasks": 0, "max_age": 0, "breaker_open": 2},
            "audit_denied": {"max_tasks": 0, "max_threads": 0, "fork_rate": 0,
                "max_instances": 0, "max_total_tasks": 0, "host_max_tasks": 0, "max_age": 0,
                "breaker_open": 0},
            "breaker": {"type": "ci", "state": "open", "step": 1, "retry_in_seconds": 2.5,
                "trips": 1, "last_cause": "failures", "seconds_since_last_change": 1.0,
                "open_since_unix_seconds": 1764806399.0, "open_for_seconds": 30.0}
        }],
        "instances": [
            {"id": 900000000000002, "path": "", "type": "ci", "tasks": 0, "admitted": false,
             "processes": 0, "threads": 0, "age_seconds": 3.0},
            {"id": 900000000000001, "path": "", "type": "ci", "tasks": 12, "admitted": true,
             "processes": 9, "threads": 3, "age_seconds": 30.5}
        ],
        "events_dropped": 1, "failed_open": 1,
        "failed_open_by": {"instances_full": 0, "processes_full": 0, "doomed_full": 0,
            "read_error": 0, "contended": 1, "kill_failed": 0},
        "maps": [{"map": "instances", "entries": 2, "capacity": 65536}],
        "entries_settled": 4, "released_late": 6
    }"#;

    #[test]
    fn a_snapshot_renders_the_same_text() {
        let s: Status = serde_json::from_str(SNAPSHOT).unwrap();
        let info = BuildInfo {
            backend: "kill".into(),
            kernel: "6.18".into(),
        };
        let daemon = DaemonView {
            ready: true,
            reload: reload::Stats {
                successes: 2,
                failures: 1,
                last_successful: false,
                last_success_unix: 1764806400.5,
                hash: "e3b0c44298fc1c14".into(),
            },
        };
        let text = render(
            &s,
            &info,
            &daemon,
            InstanceSeries::Top(5),
            &mut Names::new(vec![]),
        )
        .unwrap();
        let expected = GOLDEN.replace("VERSION", env!("CARGO_PKG_VERSION"));
        assert_eq!(text, expected, "{text}");
    }

    const GOLDEN: &str = r##"# HELP spawnguard_audit_denials_total Tasks an audit-mode type would have stopped, by budget.
# TYPE spawnguard_audit_denials_total counter
spawnguard_audit_denials_total{reason="breaker_open",type="ci"} 0
spawnguard_audit_denials_total{reason="fork_rate",type="ci"} 0
spawnguard_audit_denials_total{reason="host_max_tasks",type="ci"} 0
spawnguard_audit_denials_total{reason="max_age",type="ci"} 0
spawnguard_audit_denials_total{reason="max_instances",type="ci"} 0
spawnguard_audit_denials_total{reason="max_tasks",type="ci"} 0
spawnguard_audit_denials_total{reason="max_threads",type="ci"} 0
spawnguard_audit_denials_total{reason="max_total_tasks",type="ci"} 0
# HELP spawnguard_breaker_backoff_step Index into the type's open durations used by the next opening.
# TYPE spawnguard_breaker_backoff_step gauge
spawnguard_breaker_backoff_step{type="ci"} 1
# HELP spawnguard_breaker_open_duration_seconds How long the type's breaker's current opening lasts (its backoff step's open time, or a manual open's), 0 when it is not open: open longer than this, it waits for a probe instance.
# TYPE spawnguard_breaker_open_duration_seconds gauge
spawnguard_breaker_open_duration_seconds{type="ci"} 30
# HELP spawnguard_breaker_open_since_timestamp_seconds Unix time at which the type's breaker opened (0 when it is not open).
# TYPE spawnguard_breaker_open_since_timestamp_seconds gauge
spawnguard_breaker_open_since_timestamp_seconds{type="ci"} 1764806399
# HELP spawnguard_breaker_retry_seconds Seconds until an open breaker lets a probe through (0 when not open).
# TYPE spawnguard_breaker_retry_seconds gauge
spawnguard_breaker_retry_seconds{type="ci"} 2.5
# HELP spawnguard_breaker_state The type's circuit breaker: 1 for its current state, 0 for the others.
# TYPE spawnguard_breaker_state gauge
spawnguard_breaker_state{state="closed",type="ci"} 0
spawnguard_breaker_state{state="half-open",type="ci"} 0
spawnguard_breaker_state{state="open",type="ci"} 1
# HELP spawnguard_breaker_transitions_total Breaker transitions, by the state entered.
# TYPE spawnguard_breaker_transitions_total counter
spawnguard_breaker_transitions_total{to="closed",type="ci"} 0
spawnguard_breaker_transitions_total{to="half-open",type="ci"} 0
spawnguard_breaker_transitions_total{to="open",type="ci"} 1
# HELP spawnguard_build_info spawnguard version, enforcement backend and kernel release (always 1).
# TYPE spawnguard_build_info gauge
spawnguard_build_info{backend="kill",kernel="6.18",version="VERSION"} 1
# HELP spawnguard_condemned_killed_total Processes refused after they existed whose threads made no system call (so the sys_exit hook could not stop them), killed by the daemon through a pidfd.
# TYPE spawnguard_condemned_killed_total counter
spawnguard_condemned_killed_total 0
# HELP spawnguard_denials_total New tasks and migrations stopped, by the budget that refused them.
# TYPE spawnguard_denials_total counter
spawnguard_denials_total{reason="breaker_open",type="ci"} 2
spawnguard_denials_total{reason="fork_rate",type="ci"} 0
spawnguard_denials_total{reason="host_max_tasks",type="ci"} 0
spawnguard_denials_total{reason="max_age",type="ci"} 0
spawnguard_denials_total{reason="max_instances",type="ci"} 1
spawnguard_denials_total{reason="max_tasks",type="ci"} 3
spawnguard_denials_total{reason="max_threads",type="ci"} 0
spawnguard_denials_total{reason="max_total_tasks",type="ci"} 0
# HELP spawnguard_enforcer_ready 1 when the enforcer is attached and the policy in force (as /readyz), else 0.
# TYPE spawnguard_enforcer_ready gauge
spawnguard_enforcer_ready 1
# HELP spawnguard_events_dropped_total Kernel events lost because the ring buffer was full (the counters above still count every decision).
# TYPE spawnguard_events_dropped_total counter
spawnguard_events_dropped_total 1
# HELP spawnguard_fail_open_total New tasks let through uncounted because the kernel side could not account for them.
# TYPE spawnguard_fail_open_total counter
spawnguard_fail_open_total{cause="contended"} 1
spawnguard_fail_open_total{cause="doomed_full"} 0
spawnguard_fail_open_total{cause="instances_full"} 0
spawnguard_fail_open_total{cause="kill_failed"} 0
spawnguard_fail_open_total{cause="processes_full"} 0
spawnguard_fail_open_total{cause="read_error"} 0
# HELP spawnguard_host_tasks Live tasks in all instances of all types.
# TYPE spawnguard_host_tasks gauge
spawnguard_host_tasks 12
# HELP spawnguard_host_tasks_max The host budget ([host] max_tasks), the level above which new tasks are denied (max_tasks x deny_at), and the level at which a warning fires (max_tasks x warn_at).
# TYPE spawnguard_host_tasks_max gauge
spawnguard_host_tasks_max{limit="deny_above"} 90
spawnguard_host_tasks_max{limit="max_tasks"} 100
spawnguard_host_tasks_max{limit="warn_at"} 70
# HELP spawnguard_instance_age_seconds Seconds since the instance's cgroup was created.
# TYPE spawnguard_instance_age_seconds gauge
spawnguard_instance_age_seconds{cgroup="cgroup id 900000000000001",type="ci"} 30.5
# HELP spawnguard_instance_budget_tasks Per-instance budgets of the type: max_tasks and max_threads.
# TYPE spawnguard_instance_budget_tasks gauge
spawnguard_instance_budget_tasks{budget="max_tasks",type="ci"} 64
spawnguard_instance_budget_tasks{budget="max_threads",type="ci"} 48
# HELP spawnguard_instance_entries_settled_total Empty instance entries given back by the daemon's sweep, not by their last task (a close that missed the emulated lock, a first task refused, processes moved out).
# TYPE spawnguard_instance_entries_settled_total counter
spawnguard_instance_entries_settled_total 4
# HELP spawnguard_instance_tasks Live tasks of one of the instances with the most tasks (--metrics-instances).
# TYPE spawnguard_instance_tasks gauge
spawnguard_instance_tasks{cgroup="cgroup id 900000000000001",type="ci"} 12
# HELP spawnguard_instance_threads Live threads of the instance.
# TYPE spawnguard_instance_threads gauge
spawnguard_instance_threads{cgroup="cgroup id 900000000000001",type="ci"} 3
# HELP spawnguard_instances Admitted instances of the type (each holds one max_instances slot).
# TYPE spawnguard_instances gauge
spawnguard_instances{type="ci"} 2
# HELP spawnguard_instances_admitted_total New instances admitted (first task counted).
# TYPE spawnguard_instances_admitted_total counter
spawnguard_instances_admitted_total{type="ci"} 5
# HELP spawnguard_instances_max The type's instance ceiling (max_instances); absent when unlimited.
# TYPE spawnguard_instances_max gauge
spawnguard_instances_max{type="ci"} 4
# HELP spawnguard_map_capacity Capacity of the kernel's hash maps.
# TYPE spawnguard_map_capacity gauge
spawnguard_map_capacity{map="instances"} 65536
# HELP spawnguard_map_entries Entries in use in the kernel's hash maps (past capacity, new entries fail open).
# TYPE spawnguard_map_entries gauge
spawnguard_map_entries{map="instances"} 2
# HELP spawnguard_migrations_total Processes moved into the type's instances, by outcome.
# TYPE spawnguard_migrations_total counter
spawnguard_migrations_total{outcome="allowed",type="ci"} 1
spawnguard_migrations_total{outcome="denied",type="ci"} 2
# HELP spawnguard_policy_info The policy in force: the first 16 hex digits of its text's SHA-256 (always 1).
# TYPE spawnguard_policy_info gauge
spawnguard_policy_info{hash="e3b0c44298fc1c14"} 1
# HELP spawnguard_policy_last_reload_success_timestamp_seconds Unix time of the last successful policy load (the daemon's start, or a reload).
# TYPE spawnguard_policy_last_reload_success_timestamp_seconds gauge
spawnguard_policy_last_reload_success_timestamp_seconds 1764806400.5
# HELP spawnguard_policy_last_reload_successful 1 when the last policy reload (file watch, SIGHUP or `policy apply`) put its policy in force, 0 when it failed and the previous policy stayed.
# TYPE spawnguard_policy_last_reload_successful gauge
spawnguard_policy_last_reload_successful 0
# HELP spawnguard_policy_reloads_total Policy reloads (file watch, SIGHUP, `policy apply`), by result.
# TYPE spawnguard_policy_reloads_total counter
spawnguard_policy_reloads_total{result="failure"} 1
spawnguard_policy_reloads_total{result="success"} 2
# HELP spawnguard_processes Live processes in the type's instances.
# TYPE spawnguard_processes gauge
spawnguard_processes{type="ci"} 9
# HELP spawnguard_releases_settled_total Charges of exited tasks the kernel's free hook never gave back, given back later: by the daemon's sweep (the task gone) or when a new task got the task's address.
# TYPE spawnguard_releases_settled_total counter
spawnguard_releases_settled_total 6
# HELP spawnguard_spawns_allowed_total New tasks counted into the type's instances, by kind (process or thread).
# TYPE spawnguard_spawns_allowed_total counter
spawnguard_spawns_allowed_total{kind="process",type="ci"} 40
spawnguard_spawns_allowed_total{kind="thread",type="ci"} 7
# HELP spawnguard_tasks Live tasks (processes and threads) in the type's instances.
# TYPE spawnguard_tasks gauge
spawnguard_tasks{type="ci"} 12
# HELP spawnguard_threads Live threads in the type's instances.
# TYPE spawnguard_threads gauge
spawnguard_threads{type="ci"} 3
# HELP spawnguard_type_enforcing 1 when the type's budgets are enforced, 0 in audit mode.
# TYPE spawnguard_type_enforcing gauge
spawnguard_type_enforcing{type="ci"} 1
# HELP spawnguard_warn_threshold Usage at which the type's warning fires (warn_at of the budget), by budget: max_tasks (per instance), max_total_tasks, max_instances (absent when unlimited).
# TYPE spawnguard_warn_threshold gauge
spawnguard_warn_threshold{budget="max_instances",type="ci"} 3
spawnguard_warn_threshold{budget="max_tasks",type="ci"} 45
# HELP spawnguard_warnings_total Warning thresholds (warn_at) crossed.
# TYPE spawnguard_warnings_total counter
spawnguard_warnings_total{type="ci"} 1
"##;

    #[test]
    fn the_hottest_instances_are_the_busiest_non_empty_ones() {
        let mut s: Status = serde_json::from_str(SNAPSHOT).unwrap();
        let instance = |id, tasks| InstanceStatus {
            id,
            path: String::new(),
            type_name: "ci".into(),
            tasks,
            admitted: tasks > 0,
            processes: tasks,
            threads: 0,
            age_seconds: 1.0,
            exited_unreaped: 0,
            refused_unreaped: 0,
        };
        s.instances = vec![
            instance(3, 5),
            instance(1, 0),
            instance(2, 5),
            instance(4, 9),
        ];
        let ids = |n| hottest(&s, n).iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(2), [4, 2], "most tasks first, ties by cgroup id");
        assert_eq!(ids(10), [4, 2, 3], "never an empty instance");
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
                warn_tasks: Some(70),
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
        let text = render(
            &s,
            &info,
            &DaemonView::default(),
            InstanceSeries::Top(5),
            &mut Names::new(vec![]),
        )
        .unwrap();
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
