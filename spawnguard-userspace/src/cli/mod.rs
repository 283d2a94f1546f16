//! The command line: what each command takes (clap), and one file per command that does it
//! with the library and prints the result. All printing is here.

mod breaker;
mod demo;
mod doctor;
mod events;
mod exec;
mod gate;
mod generate;
mod policy;
mod run;
mod status;
mod top;
mod uninstall;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use spawnguard::{
    daemon,
    loader::{self, BackendChoice},
    metrics,
};

pub use gate::gate;

/// `--version` names the map layout too: the package's maintainer scripts compare it with the
/// pinned enforcer's (`/sys/fs/bpf/spawnguard/v<layout>`) to decide whether an upgrade migrates.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (map layout v{})",
        env!("CARGO_PKG_VERSION"),
        spawnguard_common::LAYOUT_VERSION
    )
});

#[derive(Parser)]
#[command(
    name = "spawnguard",
    version,
    long_version = LONG_VERSION.as_str(),
    about = "Kernel-enforced spawn budgets for AI-agent cgroups"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Do not apply the policy file when it changes. By default its directory is watched
        /// (an edit, or a Kubernetes ConfigMap's `..data` swap) and a changed file is applied
        /// after 0.5 s of quiet, as `policy apply` would; an invalid one leaves the policy in
        /// force. SIGHUP still reloads it.
        #[arg(long)]
        no_watch_policy: bool,
        /// Where to serve Prometheus metrics (`/metrics`, and the probes `/healthz` and
        /// `/readyz`), or `off`. An IPv6 address may go without brackets, as Kubernetes'
        /// `$(HOST_IP):9617` gives it.
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
        /// Test only (hidden, and refused unless `SPAWNGUARD_TEST_KNOBS=1`): the size of the
        /// process map, so the maps-at-capacity drill can fill it with a few hundred processes.
        #[arg(long, value_name = "N", hide = true,
              value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
        test_process_capacity: Option<u32>,
        /// Test only, as `--test-process-capacity`: the size of the doomed map.
        #[arg(long, value_name = "N", hide = true,
              value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
        test_doomed_capacity: Option<u32>,
        /// Open the read-only gate socket (`/run/spawnguard/gate.sock`) to this group (name or
        /// gid), so that agent runtimes that are not root can ask `gate`. Root only when
        /// omitted.
        #[arg(long, value_name = "GROUP")]
        gate_group: Option<String>,
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
        /// Instead of the host checks: load (never attach) every program of a backend as `run`
        /// would, and print the steps the kernel's verifier took for each, with their share of
        /// its limit of 1,000,000. Exits non-zero when a program takes half the limit or more.
        /// Root only; nothing stays loaded.
        #[arg(long)]
        verifier_steps: bool,
        /// The backend whose programs `--verifier-steps` loads (`auto`: the one `run` would
        /// choose here).
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto, requires = "verifier_steps")]
        backend: BackendChoice,
        /// Where `--verifier-steps` reads the counts: `prog-info` (5.16 and later) or the
        /// verifier's `log` (any kernel). Default: the first this kernel has.
        #[arg(long, value_enum, requires = "verifier_steps")]
        steps_from: Option<loader::StepsFrom>,
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
    /// Write shell completions and man pages under DIR (for packagers).
    #[command(hide = true)]
    Generate { dir: PathBuf },
}

#[derive(Subcommand)]
pub enum BreakerCommand {
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
    spawnguard::policy::parse_duration(s)
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
pub enum PolicyCommand {
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

impl Command {
    /// Whether the command logs (`gate` sits in a runtime's spawn path: no logging set-up, an
    /// env-filter parse, for it; a demo worker is a bomb).
    pub fn logs(&self) -> bool {
        !matches!(
            self,
            Command::Gate { .. } | Command::DemoWorker { .. } | Command::Generate { .. }
        )
    }
}

/// The map sizes `run` installs with. The process and doomed maps keep their defaults unless
/// a test shrinks them: both flags are hidden and need `SPAWNGUARD_TEST_KNOBS=1` as well, so a
/// production unit cannot shrink them by a stray flag.
fn map_capacity(
    instances: u32,
    processes: Option<u32>,
    doomed: Option<u32>,
) -> Result<loader::MapCapacity> {
    if (processes.is_some() || doomed.is_some())
        && std::env::var("SPAWNGUARD_TEST_KNOBS").as_deref() != Ok("1")
    {
        anyhow::bail!(
            "--test-process-capacity and --test-doomed-capacity are for spawnguard's own tests \
             (they need SPAWNGUARD_TEST_KNOBS=1)"
        );
    }
    let default = loader::MapCapacity::default();
    Ok(loader::MapCapacity {
        instances,
        processes: processes.unwrap_or(default.processes),
        doomed: doomed.unwrap_or(default.doomed),
    })
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            policy,
            backend,
            no_pin,
            no_watch_policy,
            metrics_listen,
            metrics_instances,
            instance_capacity,
            test_process_capacity,
            test_doomed_capacity,
            gate_group,
        } => run::run(daemon::Options {
            policy_file: policy,
            backend,
            no_pin,
            metrics_listen,
            metrics_instances,
            capacity: map_capacity(
                instance_capacity,
                test_process_capacity,
                test_doomed_capacity,
            )?,
            gate_group,
            watch_policy: !no_watch_policy,
        }),
        Command::Uninstall { output } => uninstall::run(output),
        Command::Exec {
            type_name,
            instance,
            policy,
            keep,
            command,
        } => exec::run(&type_name, &instance, policy.as_deref(), keep, &command),
        Command::Status { type_name, output } => status::run(type_name, output),
        Command::Events {
            follow,
            type_name,
            output,
        } => events::run(follow, type_name, output),
        Command::Top {
            interval,
            instances,
            once,
        } => top::run(interval, instances, once).map(|()| ExitCode::SUCCESS),
        Command::Doctor {
            output,
            verifier_steps: false,
            ..
        } => doctor::run(output),
        Command::Doctor {
            output,
            verifier_steps: true,
            backend,
            steps_from,
        } => doctor::verifier_steps(output, backend, steps_from),
        Command::Demo => demo::run().map(|()| ExitCode::SUCCESS),
        Command::DemoWorker { kind } => demo::worker(&kind).map(|()| ExitCode::SUCCESS),
        Command::Policy { command } => policy::run(command),
        Command::Breaker { command } => breaker::run(command),
        Command::Gate { type_name } => Ok(gate(&type_name)),
        Command::Generate { dir } => generate::run(&dir),
    }
}
