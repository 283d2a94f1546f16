//! `spawnguard`: the daemon that loads the kernel enforcer, and the CLI around it.

mod btf;
mod cgroupfs;
mod events;
mod kfunc;
mod loader;
mod policy;
mod status;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cgroupfs::Cgroup2,
    loader::{BackendChoice, DaemonState, Enforcer, RUN_DIR, STATE_FILE},
    policy::Policy,
};

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

#[derive(Clone, Copy, Default, ValueEnum)]
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
        /// How denied tasks are stopped; `auto` picks the best this kernel supports.
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        /// Remove the enforcer from the kernel when the daemon stops. By default it stays
        /// pinned and keeps enforcing the last policy; a restarted daemon adopts it.
        #[arg(long)]
        no_pin: bool,
    },
    /// Detach and remove the pinned enforcer (the daemon must be stopped first).
    Uninstall,
    /// Run CMD as (part of) an agent instance: in the instance's cgroup, created if needed.
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
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Show types, instances and their counts, read from the kernel maps.
    Status {
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the embedded default policy.
    Default,
    /// Validate a policy file; exit 0, or print the error with file, line and column.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
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
        } => {
            let policy = load_policy(policy.as_deref())?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon(policy, backend, no_pin))?;
        }
        Command::Uninstall => {
            loader::preflight()?;
            let _lock = single_daemon_lock()
                .context("stop the daemon before uninstalling (it would reinstall)")?;
            if loader::uninstall()? {
                let _ = std::fs::remove_file(STATE_FILE);
                println!("spawnguard removed from the kernel: nothing is enforced any more");
            } else {
                println!("spawnguard is not installed");
            }
        }
        Command::Exec {
            type_name,
            instance,
            policy,
            command,
        } => return Err(exec(&type_name, &instance, policy.as_deref(), &command)),
        Command::Status { output } => {
            let s = status::read()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => status::print_table(&s),
            }
        }
        Command::Policy { command } => match command {
            PolicyCommand::Default => print!("{}", policy::DEFAULT_POLICY),
            PolicyCommand::Check { file } => {
                let p = Policy::from_file(&file)?;
                println!("{}: ok ({} types)", file.display(), p.types.len());
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn load_policy(path: Option<&Path>) -> Result<Policy> {
    Ok(match path {
        Some(p) => Policy::from_file(p)?,
        None => Policy::default_policy(),
    })
}

async fn daemon(policy: Policy, backend: BackendChoice, no_pin: bool) -> Result<()> {
    loader::preflight()?;
    let _lock = single_daemon_lock()?;
    let cg = Cgroup2::discover()?;
    for fs in cgroupfs::ensure_pseudo_filesystems()? {
        tracing::info!("mounted {fs}");
    }
    let mut types = loader::place_types(&policy, &cg)?;
    let enforcer = Enforcer::start(backend, &policy, &mut types)?;
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
    let ring = enforcer.events()?;
    let state = DaemonState {
        pid: std::process::id(),
        backend: enforcer.backend,
        cgroup2: cg.mount.clone(),
        types: types.clone(),
    };
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    write_atomically(Path::new(STATE_FILE), &serde_json::to_vec_pretty(&state)?)?;
    for t in &types {
        tracing::info!(
            "enforcing type {} ({}) at {}: max_tasks {}, max_threads {}",
            t.name,
            t.mode,
            t.dir.display(),
            t.max_tasks,
            t.max_threads
        );
    }
    let events = tokio::spawn(events::log_events(ring, events::Names::new(types)));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        r = events => r??,
    }
    let _ = std::fs::remove_file(STATE_FILE);
    if no_pin {
        loader::uninstall()?;
        tracing::info!("--no-pin: removed the enforcer; nothing is enforced any more");
    } else {
        tracing::info!(
            "stopping; the enforcer stays in the kernel with the last policy \
             (`spawnguard uninstall` removes it)"
        );
    }
    Ok(())
}

/// One daemon per host: a second one would fight over the pinned maps and double-enforce.
fn single_daemon_lock() -> Result<std::fs::File> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let path = Path::new(RUN_DIR).join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
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

/// Only returns on error: on success the process becomes CMD.
fn exec(
    type_name: &str,
    instance: &str,
    policy: Option<&Path>,
    command: &[OsString],
) -> anyhow::Error {
    let attempt = || -> Result<std::io::Error> {
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
        cgroupfs::ensure_dir(&dir)?;
        cgroupfs::move_process(&dir, std::process::id())?;
        Ok(std::process::Command::new(&command[0])
            .args(&command[1..])
            .exec())
    };
    match attempt() {
        Ok(e) => anyhow!("cannot run {:?}: {e}", command[0]),
        Err(e) => e,
    }
}
