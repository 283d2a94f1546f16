//! `spawnguard run`: a few tokio tasks with one owner each. The policy task owns the policy in
//! force and the enforcer's configuration maps; the control socket and SIGHUP send it requests.
//! The event task owns the ring buffer. The max-age task watches instance ages, the settle task
//! what the hooks left behind, the backstop task the instances' `pids.max`. The kernel side
//! never waits on any of them.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    cgroupfs::{self, Cgroup2},
    control::{self, BreakerAnswer, Job, PolicyDiff, PolicyShown, Reply, Request},
    events,
    health::{self, Health},
    host,
    loader::{self, BackendChoice, DaemonState, Enforcer, PlacedType, RUN_DIR, STATE_FILE},
    metrics,
    notify::{self, Heartbeat},
    policy::{OnMaxAge, Policy},
    reload, status,
};

/// The policy in force, as the policy task keeps it.
struct InForce {
    policy: Policy,
    /// Its source text, for `policy show`.
    text: String,
    types: Vec<PlacedType>,
}

/// Field-by-field differences of two validated policies.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let mut d = PolicyDiff::default();
    let fields = |v: Value| match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let compare = |what: String, a: Value, b: Value, out: &mut Vec<String>| {
        let (a, b) = (fields(a), fields(b));
        for (k, va) in &a {
            let vb = b.get(k).cloned().unwrap_or(Value::Null);
            if *va != vb {
                out.push(format!("{what}: {k} {va} -> {vb}"));
            }
        }
    };
    compare(
        "host".into(),
        serde_json::to_value(&old.host).unwrap_or_default(),
        serde_json::to_value(&new.host).unwrap_or_default(),
        &mut d.changed,
    );
    for t in &new.types {
        match old.type_named(&t.name) {
            None => d.added.push(t.name.clone()),
            Some(o) => compare(
                format!("type {}", t.name),
                serde_json::to_value(o).unwrap_or_default(),
                serde_json::to_value(t).unwrap_or_default(),
                &mut d.changed,
            ),
        }
    }
    for t in &old.types {
        if new.type_named(&t.name).is_none() {
            d.removed.push(t.name.clone());
        }
    }
    d
}

pub struct Options {
    pub policy_file: Option<PathBuf>,
    pub backend: BackendChoice,
    pub no_pin: bool,
    pub metrics_listen: metrics::Listen,
    pub metrics_instances: metrics::InstanceSeries,
    pub capacity: loader::MapCapacity,
    /// The group the read-only gate socket is open to (root only when none).
    pub gate_group: Option<String>,
    /// Apply the policy file when it changes (its directory is watched).
    pub watch_policy: bool,
}

pub async fn run(policy: Policy, text: String, opts: Options) -> Result<()> {
    loader::preflight()?;
    let _lock = single_daemon_lock()?;
    // Before anything is installed or announced: a signal from now on is a clean stop.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cg = Cgroup2::discover()?;
    for fs in cgroupfs::ensure_pseudo_filesystems()? {
        tracing::info!("mounted {fs}");
    }
    let mut types = loader::place_types(&policy, &cg)?;
    let enforcer = Enforcer::start(opts.backend, opts.capacity, &policy, &mut types)?;
    // Loading parsed the kernel's BTF (tens of MB, freed now): give the freed heap back to the
    // system, or the daemon's resident size keeps it for its whole life.
    // SAFETY: malloc_trim only returns free heap pages; it touches no live allocation.
    unsafe { libc::malloc_trim(0) };
    tracing::info!("backend {}: {}", enforcer.backend, enforcer.backend_reason);
    if enforcer.adopted {
        tracing::info!(
            "adopted the enforcer pinned at {} (counts kept)",
            enforcer.dir.display()
        );
    } else {
        tracing::info!(
            "installed the enforcer at {}; counted {} running agent processes",
            enforcer.dir.display(),
            enforcer.reconciled
        );
    }
    log_types(&types);
    let listener = control::bind()?;
    let gate_listener = crate::gate::bind(opts.gate_group.as_deref())?;
    let metrics_listener = match opts.metrics_listen {
        metrics::Listen::At(addr) => Some((addr, metrics::bind(addr).await?)),
        metrics::Listen::Off => None,
    };
    write_state(&enforcer, &cg, &types)?;

    reload::started(&text);
    // Apply the policy file when it changes; without a file (the embedded default) there is
    // nothing to watch. A watch that cannot start (inotify limits) leaves SIGHUP and
    // `policy apply`: no reason to stop enforcing.
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let _watcher = match (&opts.policy_file, opts.watch_policy) {
        (Some(file), true) => match reload::watch(file, changed_tx.clone()) {
            Ok(w) => {
                tracing::info!(
                    "watching {} for changes (--no-watch-policy turns this off)",
                    file.display()
                );
                Some(w)
            }
            Err(e) => {
                tracing::warn!("not watching the policy file: {e:#}; SIGHUP reloads it");
                None
            }
        },
        _ => None,
    };
    // The hash of the file as last read by a reload, so an unchanged file is not re-applied.
    let mut file_hash = Some(reload::hash(&text));
    let (names_tx, names_rx) = watch::channel(types.clone());
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(16);
    let ring = enforcer.events()?;
    let mut in_force = InForce {
        policy,
        text,
        types,
    };
    let (subscribe_tx, subscribe_rx) = mpsc::channel(16);
    let (report_tx, report_rx) = mpsc::channel(256);
    let (ring_alive, max_age_alive, policy_alive) = (
        Heartbeat::default(),
        Heartbeat::default(),
        Heartbeat::default(),
    );
    let health = std::sync::Arc::new(Health::new(
        vec![
            ("the event ring reader", ring_alive.clone()),
            ("the max-age watch", max_age_alive.clone()),
            ("the policy task", policy_alive.clone()),
        ],
        health::pinned_links(),
    ));
    let mut events_task = tokio::spawn(events::run(
        ring,
        names_rx.clone(),
        subscribe_rx,
        report_rx,
        ring_alive.clone(),
    ));
    let control_task = tokio::spawn(control::serve(listener, jobs_tx, subscribe_tx));
    let gate_task = tokio::spawn(crate::gate::serve(gate_listener));
    let metrics_task = metrics_listener.map(|(addr, listener)| {
        tracing::info!("metrics at http://{addr}/metrics");
        let info = metrics::BuildInfo {
            backend: enforcer.backend.name().to_owned(),
            kernel: host::kernel_release(),
        };
        tokio::spawn(metrics::serve(
            listener,
            info,
            opts.metrics_instances,
            names_rx.clone(),
            health.clone(),
        ))
    });
    // A thread of its own: a sweep of many instance directories is blocking file system work.
    let backstop_task = {
        let (types, mount) = (names_rx.clone(), cg.mount.clone());
        std::thread::Builder::new()
            .name("backstop".into())
            .spawn(move || crate::backstop::run(types, mount))?
    };
    let max_age_task = tokio::spawn(watch_max_age(
        names_rx,
        report_tx.clone(),
        max_age_alive.clone(),
    ));
    let condemned_task = tokio::spawn(crate::condemned::watch(report_tx.clone()));
    let settle_task = tokio::spawn(crate::settle::watch());
    // Only now, with the enforcer attached, the policy in force and the control socket bound
    // (requests wait in its backlog until the loop below runs): `systemctl start` returns here.
    notify::ready(&enforcing(&in_force, &enforcer));
    health.set_ready();
    let watchdog_task = notify::watchdog_period().map(|period| {
        tracing::info!(
            "systemd watchdog: pinging every {} while the event ring, the max-age watch and \
             the control socket answer",
            humantime::format_duration(period)
        );
        tokio::spawn(notify::watchdog(
            period,
            vec![
                ("the event ring reader", ring_alive),
                ("the max-age watch", max_age_alive),
            ],
        ))
    });
    let mut jobs = jobs_rx;
    // The policy task turns at least this often: its heartbeat for `/healthz`.
    let mut beat = tokio::time::interval(notify::BEAT);
    loop {
        tokio::select! {
            Some((request, reply)) = jobs.recv() => {
                let mut owner = Owner { enforcer: &enforcer, cg: &cg, in_force: &mut in_force, names: &names_tx, report: &report_tx };
                let answer = control::dispatch(&mut owner, request);
                let _ = reply.send(Reply::from(answer));
            }
            _ = hup.recv() => {
                let ctx = ReloadCtx { enforcer: &enforcer, cg: &cg, names: &names_tx, report: &report_tx };
                file_hash = reload(&ctx, &mut in_force, opts.policy_file.as_deref(), None);
            }
            Some(()) = changed.recv() => {
                let ctx = ReloadCtx { enforcer: &enforcer, cg: &cg, names: &names_tx, report: &report_tx };
                let seen = file_hash.clone().unwrap_or_default();
                file_hash = reload(&ctx, &mut in_force, opts.policy_file.as_deref(), Some(seen));
            }
            _ = beat.tick() => policy_alive.beat(),
            _ = term.recv() => { tracing::info!("SIGTERM"); break; }
            _ = int.recv() => { tracing::info!("SIGINT"); break; }
            r = &mut events_task => { r??; break; }
        }
        if control_task.is_finished()
            || watchdog_task.as_ref().is_some_and(|t| t.is_finished())
            || gate_task.is_finished()
            || max_age_task.is_finished()
            || condemned_task.is_finished()
            || settle_task.is_finished()
            || backstop_task.is_finished()
            || metrics_task.as_ref().is_some_and(|t| t.is_finished())
        {
            bail!("a daemon task ended unexpectedly");
        }
    }
    notify::stopping(if opts.no_pin {
        "stopping; removing the enforcer (--no-pin)"
    } else {
        "stopping; the enforcer stays in the kernel with the last policy"
    });
    let _ = std::fs::remove_file(STATE_FILE);
    let _ = std::fs::remove_file(control::SOCKET);
    let _ = std::fs::remove_file(crate::gate::SOCKET);
    if opts.no_pin {
        loader::uninstall()?;
        crate::backstop::give_back_all();
        tracing::info!("--no-pin: removed the enforcer; nothing is enforced any more");
    } else {
        tracing::info!(
            "stopping; the enforcer stays in the kernel with the last policy \
             (`spawnguard uninstall` removes it)"
        );
    }
    Ok(())
}

/// The daemon's `STATUS=` line for systemd.
fn enforcing(in_force: &InForce, enforcer: &Enforcer) -> String {
    let n = in_force.types.len();
    format!(
        "enforcing {n} type{} with backend {}",
        if n == 1 { "" } else { "s" },
        enforcer.backend.name()
    )
}

fn log_types(types: &[PlacedType]) {
    for t in types {
        tracing::info!(
            "enforcing type {} ({}) at {}: max_tasks {}, max_threads {}",
            t.name,
            t.mode,
            t.dir.display(),
            t.max_tasks,
            t.max_threads
        );
    }
}

fn write_state(enforcer: &Enforcer, cg: &Cgroup2, types: &[PlacedType]) -> Result<()> {
    let state = DaemonState {
        pid: std::process::id(),
        backend: enforcer.backend,
        cgroup2: cg.mount.clone(),
        types: types.to_vec(),
    };
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    write_atomically(Path::new(STATE_FILE), &serde_json::to_vec_pretty(&state)?)
}

/// The daemon's side of the control requests (runs in the policy task, which owns `in_force`).
struct Owner<'a> {
    enforcer: &'a Enforcer,
    cg: &'a Cgroup2,
    in_force: &'a mut InForce,
    names: &'a watch::Sender<Vec<PlacedType>>,
    report: &'a mpsc::Sender<events::EventRecord>,
}

impl control::Backend for Owner<'_> {
    fn status(&mut self) -> Result<Value> {
        Ok(serde_json::to_value(status::read()?)?)
    }

    fn policy_shown(&self) -> Result<PolicyShown> {
        Ok(PolicyShown {
            text: self.in_force.text.clone(),
            policy: serde_json::to_value(&self.in_force.policy)?,
        })
    }

    fn breaker(&mut self, request: &Request) -> Result<BreakerAnswer> {
        let Some(type_name) = request.breaker_type() else {
            bail!("not a breaker request");
        };
        let before = crate::breaker::status(Some(type_name)).ok();
        let answer = breaker_request(request)?;
        let after = &answer.breaker;
        let from = before
            .and_then(|v| v.into_iter().next())
            .map(|v| v.state)
            .unwrap_or_default();
        let message = answer.message.clone();
        let mut record = if from == after.state {
            events::EventRecord::from_daemon("failure_reported", "manual", Some(type_name), message)
        } else {
            events::EventRecord::from_daemon("breaker", "manual", Some(type_name), message)
        };
        if from != after.state {
            record.breaker = Some(events::BreakerChange {
                from,
                to: after.state.clone(),
                retry_at: None,
            });
        }
        record.reason = Some("manual".into());
        // The stream is a report: a full queue drops the record, never the command.
        let _ = self.report.try_send(record);
        Ok(answer)
    }

    fn apply(&mut self, policy: Policy, text: &str) -> Result<PolicyDiff> {
        apply(
            self.enforcer,
            self.cg,
            self.in_force,
            self.names,
            policy,
            text.to_owned(),
        )
    }

    fn applied(&mut self, file: &str, text: &str, result: &Result<PolicyDiff>) {
        let now = enforcing(self.in_force, self.enforcer);
        match result {
            Ok(d) => {
                tracing::info!("policy applied from {file}: {d:?}");
                notify::status(&format!("{now}; policy applied from {file}"));
                let hash = reload::hash(text);
                reloaded(
                    self.report,
                    "policy_apply",
                    Ok(&hash),
                    format!("{file}: {d:?}"),
                );
            }
            Err(e) => {
                notify::status(&format!(
                    "{now}; policy apply from {file} failed, the previous policy stays: {e:#}"
                ));
                reloaded(self.report, "policy_apply", Err(()), format!("{e:#}"));
            }
        }
    }
}

/// Carries out a breaker command (from the control socket, or from the CLI when no daemon
/// runs) and says what it did.
pub fn breaker_request(request: &Request) -> Result<BreakerAnswer> {
    let why = |r: &Option<String>| r.as_deref().map_or_else(String::new, |r| format!(": {r}"));
    let (view, line) = match request {
        Request::BreakerOpen {
            type_name,
            for_ms,
            reason,
        } => {
            let v = crate::breaker::open(type_name, for_ms.map(Duration::from_millis))?;
            let line = format!("breaker of type {type_name} opened by hand{}", why(reason));
            (v, line)
        }
        Request::BreakerClose { type_name } => {
            let v = crate::breaker::close(type_name)?;
            (v, format!("breaker of type {type_name} closed by hand"))
        }
        Request::BreakerReportFailure { type_name, reason } => {
            let (v, opened) = crate::breaker::report_failure(type_name)?;
            let line = format!(
                "failure reported for type {type_name}{}{}",
                why(reason),
                if opened { "; the breaker opened" } else { "" }
            );
            (v, line)
        }
        _ => bail!("not a breaker request"),
    };
    tracing::warn!("{line}");
    Ok(BreakerAnswer {
        breaker: view,
        message: line,
    })
}

/// Puts a validated policy in force: all of it, or (on any error) none of it.
fn apply(
    enforcer: &Enforcer,
    cg: &Cgroup2,
    in_force: &mut InForce,
    names: &watch::Sender<Vec<PlacedType>>,
    policy: Policy,
    text: String,
) -> Result<PolicyDiff> {
    let mut types = loader::place_types(&policy, cg)?;
    match enforcer.put_in_force(&policy, &mut types) {
        Ok(0) => {}
        Ok(n) => tracing::info!("counted {n} processes already running in the types added"),
        Err(e) => {
            // Put the old policy back in every map before reporting.
            let mut old = in_force.types.clone();
            enforcer
                .apply_policy(&in_force.policy, &mut old, &[])
                .context("restoring the previous policy after a failed apply")?;
            return Err(e.context("applying the policy; the previous policy is still in force"));
        }
    }
    let d = diff(&in_force.policy, &policy);
    write_state(enforcer, cg, &types)?;
    let _ = names.send(types.clone());
    *in_force = InForce {
        policy,
        text,
        types,
    };
    Ok(d)
}

/// What a reload works with, besides the policy in force.
struct ReloadCtx<'a> {
    enforcer: &'a Enforcer,
    cg: &'a Cgroup2,
    names: &'a watch::Sender<Vec<PlacedType>>,
    report: &'a mpsc::Sender<events::EventRecord>,
}

/// Re-reads the policy file and applies it with the same validation and atomicity as
/// `policy apply`: on SIGHUP (`seen` is `None`: always), or when the watch saw its directory
/// change (only when the file's hash differs from `seen`, the one last read). Returns the
/// hash of the file as read now (`seen` when it could not be read).
fn reload(
    ctx: &ReloadCtx,
    in_force: &mut InForce,
    file: Option<&Path>,
    seen: Option<String>,
) -> Option<String> {
    let source = if seen.is_some() { "watch" } else { "sighup" };
    let Some(file) = file else {
        tracing::warn!("SIGHUP: running the embedded default policy, no file to re-read");
        return seen;
    };
    // A file a non-root user could change since the last load is refused like an invalid
    // one: the policy in force stays. (A file missing in a ConfigMap swap is left to the read
    // below, which waits for the next change.)
    match crate::trust::check_policy_file(file) {
        Err(crate::trust::TrustError::Io { .. }) | Ok(()) => {}
        Err(e) => {
            let e = anyhow::Error::from(e).context("refusing the policy file");
            let what = if seen.is_some() {
                "policy watch"
            } else {
                "SIGHUP"
            };
            tracing::error!("{what}: {e:#}; the previous policy is still in force");
            notify::status(&format!(
                "{}; reloading {} refused, the previous policy stays: {e:#}",
                enforcing(in_force, ctx.enforcer),
                file.display()
            ));
            reloaded(
                ctx.report,
                source,
                Err(()),
                format!("{e:#}; the previous policy is still in force"),
            );
            // Not the hash of what was refused: the same text, made safe, is applied.
            return seen.map(|_| String::new());
        }
    }
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        // A ConfigMap swap in progress, or the file moved away: wait for the next change.
        Err(e) if seen.is_some() => {
            tracing::warn!(
                "policy watch: reading {}: {e}; waiting for the next change",
                file.display()
            );
            return seen;
        }
        Err(e) => {
            let e = anyhow::Error::from(e).context(format!("reading {}", file.display()));
            tracing::error!("SIGHUP: {e:#}; the previous policy is still in force");
            reloaded(ctx.report, source, Err(()), format!("{e:#}"));
            return seen;
        }
    };
    let hash = reload::hash(&text);
    if seen.as_deref() == Some(hash.as_str()) {
        return Some(hash);
    }
    let result = Policy::parse(&text, &file.display().to_string())
        .map_err(anyhow::Error::from)
        .and_then(|policy| apply(ctx.enforcer, ctx.cg, in_force, ctx.names, policy, text));
    let now = enforcing(in_force, ctx.enforcer);
    let what = if seen.is_some() {
        "policy file changed"
    } else {
        "SIGHUP"
    };
    match result {
        Ok(d) => {
            tracing::info!("{what}: policy reloaded from {}: {d:?}", file.display());
            notify::status(&format!("{now}; policy reloaded from {}", file.display()));
            reloaded(
                ctx.report,
                source,
                Ok(&hash),
                format!("policy reloaded from {}: {d:?}", file.display()),
            );
        }
        Err(e) => {
            tracing::error!("{what}: {e:#}; the previous policy is still in force");
            notify::status(&format!(
                "{now}; reloading {} failed, the previous policy stays: {e:#}",
                file.display()
            ));
            reloaded(
                ctx.report,
                source,
                Err(()),
                format!("{e:#}; the previous policy is still in force"),
            );
        }
    }
    Some(hash)
}

/// Counts a reload for `/metrics` and reports it on the event stream (kind `policy_reload`,
/// cause the source: `watch`, `sighup` or `policy_apply`; reason `success` or `failure`).
fn reloaded(
    report: &mpsc::Sender<events::EventRecord>,
    source: &str,
    outcome: Result<&str, ()>,
    message: String,
) {
    match outcome {
        Ok(hash) => reload::succeeded(hash),
        Err(()) => reload::failed(),
    }
    let mut record = events::EventRecord::from_daemon("policy_reload", source, None, message);
    record.reason = Some(
        if outcome.is_ok() {
            "success"
        } else {
            "failure"
        }
        .into(),
    );
    // The stream is a report: a full queue drops the record, never the reload.
    let _ = report.try_send(record);
}

/// Applies `on_max_age` to instances older than their type's `max_age`, once per instance.
/// Beats `alive` on every turn (every 500 ms).
async fn watch_max_age(
    mut types: watch::Receiver<Vec<PlacedType>>,
    report: mpsc::Sender<events::EventRecord>,
    alive: Heartbeat,
) -> Result<()> {
    let mut acted: HashSet<u64> = HashSet::new();
    let mut instance_map = None;
    // Its cadence is also its heartbeat's (`notify::BEAT`, 500 ms).
    let mut tick = tokio::time::interval(notify::BEAT);
    let mut names = events::Names::new(types.borrow_and_update().clone());
    loop {
        tick.tick().await;
        alive.beat();
        if types.has_changed().unwrap_or(false) {
            names = events::Names::new(types.borrow_and_update().clone());
        }
        let current = types.borrow().clone();
        // Most policies set no max_age: then there is nothing to read.
        if current.iter().all(|t| t.max_age.is_none()) {
            acted.clear();
            continue;
        }
        // Without paths: only the instances acted on are looked up by id.
        if instance_map.is_none() {
            instance_map = status::open_instance_map().ok();
        }
        let Some(ages) = instance_map
            .as_ref()
            .and_then(|m| status::instance_ages(m).ok())
        else {
            continue;
        };
        for i in &ages {
            let Some(t) = current.iter().find(|t| t.index == i.type_idx) else {
                continue;
            };
            let Some(max_age) = t.max_age else { continue };
            if i.age_seconds < max_age.as_secs_f64() || !acted.insert(i.id) {
                continue;
            }
            let path = names.instance(i.id);
            let dir = Path::new(&path);
            let outcome = match t.on_max_age {
                OnMaxAge::Event => Ok("reported"),
                OnMaxAge::Freeze => cgroupfs::freeze(dir).map(|()| "frozen"),
                OnMaxAge::Kill => cgroupfs::kill(dir).map(|()| "killed"),
            };
            let message = match outcome {
                Ok(what) => format!(
                    "max age: instance {path} (type {}) is {:.0}s old, over its max_age of {}s: {what}",
                    t.name,
                    i.age_seconds,
                    max_age.as_secs()
                ),
                Err(e) => format!("max age: instance {path}: {e:#}"),
            };
            tracing::warn!("{message}");
            let mut record =
                events::EventRecord::from_daemon("max_age", "timer", Some(&t.name), message);
            record.instance = Some(path.clone());
            record.instance_id = i.id;
            record.reason = Some("max_age".into());
            record.usage = Some(i.age_seconds as u64);
            record.limit = Some(max_age.as_secs());
            let _ = report.try_send(record);
        }
        let live: HashSet<u64> = ages.iter().map(|i| i.id).collect();
        acted.retain(|id| live.contains(id));
    }
}

/// One daemon per host: a second one would fight over the pinned maps.
pub fn single_daemon_lock() -> Result<std::fs::File> {
    // First use of the run directory: the control socket and this lock live there.
    crate::trust::ensure_root_dir(Path::new(RUN_DIR))
        .context("refusing to start: the run directory is not safe")?;
    let path = Path::new(RUN_DIR).join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        let holder = DaemonState::read().map_or_else(String::new, |s| format!(" (pid {})", s.pid));
        bail!("another spawnguard daemon is already running{holder}; stop it first");
    }
    Ok(file)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_added_removed_and_changed() {
        let old = Policy::parse(
            "[[type]]\nname = \"a\"\npath = \"x/a\"\nmax_tasks = 64\n\
             [[type]]\nname = \"b\"\npath = \"x/b\"\nmax_tasks = 5\n",
            "old",
        )
        .unwrap();
        let new = Policy::parse(
            "[host]\nmax_tasks = 100\n[[type]]\nname = \"a\"\npath = \"x/a\"\nmax_tasks = 32\n\
             [[type]]\nname = \"c\"\npath = \"x/c\"\nmax_tasks = 5\n",
            "new",
        )
        .unwrap();
        let d = diff(&old, &new);
        assert_eq!(d.added, ["c"]);
        assert_eq!(d.removed, ["b"]);
        assert!(
            d.changed.contains(&"type a: max_tasks 64 -> 32".to_owned()),
            "{d:?}"
        );
        assert!(
            d.changed
                .contains(&"type a: max_threads 64 -> 32".to_owned()),
            "{d:?}"
        );
        assert!(
            d.changed
                .contains(&"host: max_tasks null -> 100".to_owned()),
            "{d:?}"
        );
        assert_eq!(diff(&new, &new), PolicyDiff::default());
    }
}
