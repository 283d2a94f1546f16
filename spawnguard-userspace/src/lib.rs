//! spawnguard's library: everything the daemon and the CLI do, for them and for agent runtimes
//! written in Rust. `gate::check` answers "would a new instance of this type be admitted now"
//! without starting a process. ARCHITECTURE.md gives the layers and which way data flows; each
//! module uses only those listed above it here.

// Host facts and the kernel's own descriptions.
pub mod btf;
pub mod cgroupfs;
pub mod cgroupns;
pub mod host;
pub mod kfunc;
pub mod policy;
pub mod trust;

// The pinned state and the enforcer: install, attach, pin, reconcile, uninstall.
pub mod loader;
pub mod mapbatch;
pub mod pinned;

// Models read from the pinned state.
pub mod breaker;
pub mod events;
pub mod status;

// What the daemon runs beside the kernel.
pub mod backstop;
pub mod condemned;
pub mod reload;
pub mod settle;

// Outputs, the control socket, and the client side of it.
pub mod client;
pub mod control;
pub mod gate;
pub mod notify;
// The probes read the loops' heartbeats; /metrics serves them.
pub mod health;
pub mod metrics;

// The daemon, and the host check.
pub mod daemon;
pub mod doctor;
