//! `spawnguard`: the daemon that loads the kernel enforcer, and the CLI around it.

mod backstop;
mod breaker;
mod btf;
mod cgroupfs;
mod condemned;
mod control;
mod daemon;
mod demo;
mod doctor;
mod events;
mod host;
mod kfunc;
mod loader;
mod mapbatch;
mod metrics;
mod policy;
mod settle;
mod status;
mod top;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::{
    cgroupfs::Cgroup2,
    control::{Request, Unreachable},
    loader::{BackendChoice, DaemonState, STATE_FILE},
    policy::Policy,
};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "spawnguard",
    version,
    about = "Kernel-enforced spawn budgets for AI-agent cgroups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the enforcer and run in the foreground until SIGINT/SIGTERM.
    Run {
        /// Policy file (TOML); the embedded default policy when omitted.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// How denied tasks are stopped: `lsm` fails the fork with EAGAIN, `kill` and
        /// `kill-compat` kill the new task before it runs; `auto` picks the first of these
        /// this kernel supports.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        /// Remove the enforcer from the kernel when the daemon stops. By default it stays
        /// pinned and keeps enforcing the last policy; a restarted daemon adopts it.
        #[arg(long)]
        no_pin: bool,
        /// Where to serve Prometheus metrics (`/metrics`), or `off`.
        #[arg(long, value_name = "ADDR|off", default_value = metrics::DEFAULT_LISTEN)]
        metrics_listen: metrics::Listen,
        /// Series of their own for the N instances with the most tasks (`top:N`, N up to
        /// 1000), or `off`. Off by default: per-instance series multiply with agents.
        #[arg(long, value_name = "off|top:N", default_value = "off")]
        metrics_instances: metrics::InstanceSeries,
        /// Instances that may hold tasks at once (the kernel's instance map; an empty instance
        /// directory holds no entry). Fixed when the enforcer is installed: to change it on a
        /// pinned enforcer, `spawnguard uninstall` first. `status` and `doctor` warn at 80 %.
        #[arg(long, value_name = "N", default_value_t = spawnguard_common::MAX_INSTANCES,
              value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
        instance_capacity: u32,
    },
    /// Detach and remove the pinned enforcer (the daemon must be stopped first).
    Uninstall {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Run CMD as (part of) an agent instance: in the instance's cgroup, created if needed.
    ///
    /// CMD runs as a child process that moves itself into the instance; `spawnguard exec` waits
    /// outside it (it does not count toward the instance's budget), relays SIGINT, SIGTERM,
    /// SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it (a SIGKILL of it kills CMD too), and exits
    /// with its exit code (128+N when signal N killed it). When CMD ends, the instance directory
    /// is removed if this command created it. If processes CMD left behind, or nested cgroups,
    /// are still in it, it is kept (nothing is killed) and one line on stderr says so. With
    /// `--keep`, spawnguard moves itself into the instance and becomes CMD: no parent process,
    /// the directory stays.
    Exec {
        /// The agent type (a type name of the policy in force).
        #[arg(long = "type")]
        type_name: String,
        /// The instance name: the cgroup directory under the type's directory.
        #[arg(long)]
        instance: String,
        /// Read the type from this policy file instead of the running daemon's.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Become CMD inside the instance (exec in place, no waiting parent) and leave the
        /// instance directory in place when CMD ends.
        #[arg(long)]
        keep: bool,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Per type: instances/ceiling, tasks/budgets, denials, mode. Asks the daemon; when it does
    /// not answer, reads the pinned kernel maps directly (and says so).
    Status {
        /// List this type's instances with their counts and age.
        #[arg(long = "type")]
        type_name: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The per-type circuit breakers (shared by every instance, kept in the kernel).
    Breaker {
        #[command(subcommand)]
        command: BreakerCommand,
    },
    /// What the kernel reported: denials (with the budget and its usage), admissions,
    /// breaker transitions, warnings, max-age actions, fail-opens. The daemon keeps the last
    /// 1000; `--follow` streams new ones. With no daemon, reads the kernel's ring directly.
    Events {
        /// Keep streaming new events until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only this type's events.
        #[arg(long = "type")]
        type_name: Option<String>,
        /// `json`: one object a line, schema in the README ("Event stream").
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// A live view of the types and their hottest instances: tasks against budgets, spawns
    /// and denials per second, breaker state, age. `q` quits. Reads the pinned maps.
    Top {
        /// Time between refreshes.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// Hottest instances shown under each type.
        #[arg(long, default_value_t = 5)]
        instances: usize,
        /// Print one frame and exit (also what happens when stdout is not a terminal).
        #[arg(long)]
        once: bool,
    },
    /// What this host offers spawnguard: kernel, BTF, LSMs and whether BPF LSM programs load,
    /// the kill kfunc, cgroup2, bpffs, tracefs; the backend `auto` would choose and why; one
    /// line of advice per missing piece. Exits non-zero when spawnguard cannot run at all.
    Doctor {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// A one-minute tour: adds a throw-away type to the running daemon's policy (or starts a
    /// daemon of its own), runs a bounded fork bomb, thread bomb and crash-respawn loop in it,
    /// shows each being contained, and removes everything it made.
    Demo,
    /// A bomb of `spawnguard demo`, run inside its instance cgroup (bounded).
    #[command(hide = true)]
    DemoWorker { kind: String },
    /// Exit 0 when a new instance of TYPE would be admitted now; otherwise exit 1 with one line
    /// saying why not. Reads the pinned maps directly: no daemon round trip. Call it before
    /// spawning an agent.
    Gate {
        #[arg(value_name = "TYPE")]
        type_name: String,
    },
}

#[derive(Subcommand)]
enum BreakerCommand {
    /// Open the breaker: no new instance of TYPE is admitted until it half-opens.
    Open {
        #[arg(value_name = "TYPE")]
        type_name: String,
        /// How long (30s, 2m, 1h); default: the current backoff step's open time.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<std::time::Duration>,
        /// Why (logged by the daemon).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Close the breaker and reset its backoff.
    Close {
        #[arg(value_name = "TYPE")]
        type_name: String,
    },
    /// State, backoff step, time to the next probe, times opened.
    Status {
        #[arg(value_name = "TYPE")]
        type_name: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Count one failure (e.g. the agent's upstream API is down): `failures` of them within
    /// `within` open the breaker for every instance of TYPE.
    ReportFailure {
        #[arg(value_name = "TYPE")]
        type_name: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    policy::parse_duration(s)
}

/// A refresh interval: 100ms or more.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 500ms, 2s)"))?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!("{s:?} is shorter than 100ms"));
    }
    Ok(d)
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the embedded default policy.
    Default,
    /// Validate a policy file; exit 0, or print the error with file, line and column. Needs no
    /// daemon (use it in a policy repository's CI).
    Check {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Validate a policy file, apply it to the running daemon (all of it or none of it), and
    /// show what changed.
    Apply {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the policy in force.
    Show {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

fn main() -> ExitCode {
    // `spawnguard gate TYPE` sits in a runtime's spawn path: answered before the command line
    // parser and logging are set up (together they cost a third of a millisecond).
    let args: Vec<OsString> = std::env::args_os().collect();
    if let [_, verb, type_name] = args.as_slice() {
        if verb == "gate" && !type_name.to_string_lossy().starts_with('-') {
            return gate(&type_name.to_string_lossy());
        }
    }
    let cli = Cli::parse();
    // `gate` sits in a runtime's spawn path: no logging set-up (an env-filter parse) for it.
    if !matches!(
        cli.command,
        Command::Gate { .. } | Command::DemoWorker { .. }
    ) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spawnguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            policy,
            backend,
            no_pin,
            metrics_listen,
            metrics_instances,
            instance_capacity,
        } => {
            let (parsed, text) = load_policy(policy.as_deref())?;
            let opts = daemon::Options {
                policy_file: policy,
                backend,
                no_pin,
                metrics_listen,
                metrics_instances,
                capacity: loader::MapCapacity {
                    instances: instance_capacity,
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(parsed, text, opts))?;
        }
        Command::Uninstall { output } => {
            loader::preflight()?;
            let _lock = daemon::single_daemon_lock()
                .context("stop the daemon before uninstalling (it would reinstall)")?;
            let removed = loader::uninstall()?;
            let _ = std::fs::remove_file(STATE_FILE);
            // The pids.max limits the backstop wrote go back to what was there before.
            backstop::give_back_all();
            match (output, removed) {
                (Output::Json, _) => println!("{}", serde_json::json!({ "removed": removed })),
                (Output::Table, true) => {
                    println!("spawnguard removed from the kernel: nothing is enforced any more");
                }
                (Output::Table, false) => println!("spawnguard is not installed"),
            }
        }
        Command::Exec {
            type_name,
            instance,
            policy,
            keep,
            command,
        } => return exec(&type_name, &instance, policy.as_deref(), keep, &command),
        Command::Status { type_name, output } => {
            let mut s = match control::call(&Request::Status) {
                Ok(answer) => serde_json::from_value(answer?)?,
                Err(Unreachable::NotRunning) => status::read()?,
                Err(Unreachable::Other(e)) => {
                    eprintln!(
                        "spawnguard: the daemon did not answer ({e:#}); reading the pinned maps"
                    );
                    status::read()?
                }
            };
            if let Some(t) = &type_name {
                if !s.types.iter().any(|x| &x.name == t) {
                    bail!("no type {t:?} in the policy in force");
                }
                s.types.retain(|x| &x.name == t);
                s.instances.retain(|i| &i.type_name == t);
            } else if output == Output::Table {
                s.instances.clear();
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => status::print_table(&s),
            }
        }
        Command::Events {
            follow,
            type_name,
            output,
        } => events_command(follow, type_name, output)?,
        Command::Top {
            interval,
            instances,
            once,
        } => top::run(interval, instances, once)?,
        Command::Doctor { output } => {
            let report = doctor::run();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => doctor::print_table(&report),
            }
            if !report.can_run {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Demo => demo::run()?,
        Command::DemoWorker { kind } => demo::worker(&kind)?,
        Command::Policy { command } => return policy_command(command),
        Command::Breaker { command } => breaker_command(command)?,
        Command::Gate { type_name } => return Ok(gate(&type_name)),
    }
    Ok(ExitCode::SUCCESS)
}

fn events_command(follow: bool, type_name: Option<String>, output: Output) -> Result<()> {
    use std::io::Write;
    let print = |r: events::EventRecord| -> Result<()> {
        let mut out = std::io::stdout().lock();
        match output {
            Output::Json => writeln!(out, "{}", serde_json::to_string(&r)?)?,
            Output::Table => writeln!(out, "{} {:<12} {}", r.time, r.kind, r.message)?,
        }
        // A reader at the other end of a pipe sees each event as it happens.
        out.flush()?;
        Ok(())
    };
    match control::follow_events(follow, type_name.clone(), print) {
        Ok(()) => Ok(()),
        Err(Unreachable::NotRunning) => {
            eprintln!(
                "spawnguard: the daemon is not running; reading the kernel's event ring directly \
                 (events read here are not seen by a daemon started later)"
            );
            events::read_pinned(follow, type_name.as_deref(), print)
        }
        Err(Unreachable::Other(e)) => Err(e),
    }
}

/// `spawnguard gate TYPE`: exit 0 when a new instance would be admitted now, else 1 with one
/// line why (2 when it cannot tell).
fn gate(type_name: &str) -> ExitCode {
    match breaker::gate(type_name) {
        Ok(None) => {
            println!("ok: a new {type_name} instance would be admitted now");
            ExitCode::SUCCESS
        }
        Ok(Some(why)) => {
            println!("no: {why}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("spawnguard: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Breaker commands go through the daemon when it runs (it logs them), and straight to the
/// pinned maps when it does not.
fn breaker_command(command: BreakerCommand) -> Result<()> {
    let request = match &command {
        BreakerCommand::Status { type_name, output } => {
            let views = breaker::status(type_name.as_deref())?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&views)?),
                Output::Table => {
                    for v in &views {
                        println!("{}", breaker::describe(v));
                    }
                }
            }
            return Ok(());
        }
        BreakerCommand::Open {
            type_name,
            duration,
            reason,
        } => Request::BreakerOpen {
            type_name: type_name.clone(),
            for_ms: duration.map(|d| d.as_millis() as u64),
            reason: reason.clone(),
        },
        BreakerCommand::Close { type_name } => Request::BreakerClose {
            type_name: type_name.clone(),
        },
        BreakerCommand::ReportFailure { type_name, reason } => Request::BreakerReportFailure {
            type_name: type_name.clone(),
            reason: reason.clone(),
        },
    };
    let answer = match control::call(&request) {
        Ok(answer) => answer?,
        Err(Unreachable::NotRunning) => daemon::breaker_request(&request)?,
        Err(Unreachable::Other(e)) => return Err(e),
    };
    let v: breaker::BreakerView = serde_json::from_value(answer["breaker"].clone())?;
    println!("{}", breaker::describe(&v));
    Ok(())
}

/// The policy to run with, and its text (for `policy show`).
fn load_policy(path: Option<&Path>) -> Result<(Policy, String)> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the policy file {}", p.display()))?;
            (Policy::parse(&text, &p.display().to_string())?, text)
        }
        None => (Policy::default_policy(), policy::DEFAULT_POLICY.to_owned()),
    })
}

fn policy_command(command: PolicyCommand) -> Result<ExitCode> {
    match command {
        PolicyCommand::Default => print!("{}", policy::DEFAULT_POLICY),
        PolicyCommand::Check { file, output } => match (Policy::from_file(&file), output) {
            (Ok(p), Output::Table) => {
                println!("{}: ok ({} types)", file.display(), p.types.len());
            }
            (Ok(p), Output::Json) => println!(
                "{}",
                serde_json::json!({"ok": true, "file": file, "types": p.types.len()})
            ),
            (Err(e), Output::Table) => return Err(e.into()),
            (Err(e), Output::Json) => {
                println!("{}", serde_json::json!({"ok": false, "error": e}));
                return Ok(ExitCode::FAILURE);
            }
        },
        PolicyCommand::Apply { file, output } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading the policy file {}", file.display()))?;
            let name = file.display().to_string();
            // Validate here first: a bad file never reaches the daemon.
            Policy::parse(&text, &name)?;
            let answer = control::call_daemon(&Request::PolicyApply { file: name, text })?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                Output::Table => {
                    let d: daemon::PolicyDiff = serde_json::from_value(answer)?;
                    println!("applied {}", file.display());
                    for t in &d.added {
                        println!("  + type {t}");
                    }
                    for t in &d.removed {
                        println!("  - type {t}");
                    }
                    for c in &d.changed {
                        println!("  ~ {c}");
                    }
                    if d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty() {
                        println!("  (no changes)");
                    }
                }
            }
        }
        PolicyCommand::Show { output } => {
            let answer = control::call_daemon(&Request::PolicyShow)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&answer["policy"])?),
                Output::Table => print!("{}", answer["text"].as_str().unwrap_or_default()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `spawnguard exec`: runs CMD in the instance cgroup as a child process, waits outside the
/// instance, and removes the instance directory afterwards if it created it and it is empty.
/// With `keep`, moves this process into the instance and becomes CMD: only returns on error.
fn exec(
    type_name: &str,
    instance: &str,
    policy: Option<&Path>,
    keep: bool,
    command: &[OsString],
) -> Result<ExitCode> {
    if instance.is_empty() || instance.contains('/') || instance.starts_with('.') {
        bail!("--instance must be a plain directory name, got {instance:?}");
    }
    let type_dir = match (policy, DaemonState::read()) {
        (Some(p), _) => {
            let policy = Policy::from_file(p)?;
            let t = policy
                .type_named(type_name)
                .ok_or_else(|| anyhow!("no type {type_name:?} in {}", p.display()))?;
            Cgroup2::discover()?.dir(&t.path)
        }
        (None, Some(state)) => state
            .types
            .iter()
            .find(|t| t.name == type_name)
            .map(|t| t.dir.clone())
            .ok_or_else(|| anyhow!("the running daemon has no type {type_name:?}"))?,
        (None, None) => {
            let policy = Policy::default_policy();
            let t = policy.type_named(type_name).ok_or_else(|| {
                anyhow!("no daemon is running and the default policy has no type {type_name:?}")
            })?;
            Cgroup2::discover()?.dir(&t.path)
        }
    };
    let dir = type_dir.join(instance);
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    if keep {
        cgroupfs::ensure_dir(&dir)?;
        cgroupfs::move_process(&dir, std::process::id())?;
        let e = cmd.exec();
        bail!("cannot run {:?}: {e}", command[0]);
    }
    let created = cgroupfs::create_dir(&dir)?;
    let status = match cgroupfs::run_in(&dir, &mut cmd) {
        Ok(status) => status,
        Err(e) => {
            if created {
                // Nothing ever ran in it.
                let _ = cgroupfs::remove_empty(&dir, std::time::Duration::from_secs(2));
            }
            return Err(e.into());
        }
    };
    if created {
        if let Err(why) = cgroupfs::remove_empty(&dir, std::time::Duration::from_secs(2)) {
            eprintln!("spawnguard exec: kept {}: {why}", dir.display());
        }
    }
    Ok(ExitCode::from(cgroupfs::shell_exit_code(status)))
}
