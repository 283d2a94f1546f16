//! Where the enforcer is pinned and how its maps are opened: the pin directory of this map
//! layout, the pinned maps, the side of the policy maps in force, the enforcers of other
//! layouts, and the daemon's state file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use serde::{Deserialize, Serialize};
use spawnguard_common::{maps, LAYOUT_VERSION};

use super::{Backend, PlacedType};

pub const PIN_ROOT: &str = "/sys/fs/bpf/spawnguard";
pub const RUN_DIR: &str = "/run/spawnguard";
pub const STATE_FILE: &str = "/run/spawnguard/state.json";

/// What the daemon writes to `STATE_FILE` for the CLI (`status`, `exec`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub backend: Backend,
    pub cgroup2: PathBuf,
    pub types: Vec<PlacedType>,
}

impl DaemonState {
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string(STATE_FILE).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Where the pinned enforcer lives: `PIN_ROOT/v<LAYOUT_VERSION>/{links,maps}`.
pub fn pin_dir() -> PathBuf {
    Path::new(PIN_ROOT).join(format!("v{LAYOUT_VERSION}"))
}

/// Opens a pinned map by name.
pub fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// The side of the double-buffered policy maps in force in the enforcer pinned at `dir`.
pub fn policy_side(dir: &Path) -> Result<u32> {
    let side: Array<_, u32> = Array::try_from(open_pinned(dir, maps::POLICY_SIDE)?)?;
    Ok(side.get(&0, 0)? & 1)
}

/// The side in force of the installed enforcer's policy maps.
pub fn installed_policy_side() -> Result<u32> {
    policy_side(&pin_dir())
}

/// Opens a map of the installed enforcer, or says that none is installed.
pub fn open_installed(name: &str) -> Result<Map> {
    let dir = pin_dir();
    if !dir.exists() {
        bail!(
            "no spawnguard enforcer is installed ({} is missing): start one with `spawnguard run`",
            dir.display()
        );
    }
    open_pinned(&dir, name)
}

/// The pinned enforcers of other map layouts (`v<N>` directory names under `PIN_ROOT`).
pub fn other_layouts() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| *name != format!("v{LAYOUT_VERSION}"))
        .collect()
}

/// Fails when pinned state of another layout version exists: adopting it would corrupt it.
pub(super) fn check_no_other_layout() -> Result<()> {
    if let Some(name) = other_layouts().first() {
        bail!(
            "{PIN_ROOT}/{name} holds an enforcer with another map layout (this daemon uses \
             v{LAYOUT_VERSION}); it keeps enforcing its last policy. To migrate: stop its \
             daemon, run `spawnguard uninstall` (removes every pinned layout), then start this \
             daemon, which counts the running agents again"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        loader::placed,
        policy::{Mode, Policy},
    };

    /// The state file of a running daemon is read by the CLI of another build: its words stay.
    #[test]
    fn the_state_file_names_backends_and_modes_as_words() {
        let policy = Policy::parse(
            "[[type]]\nname = \"a\"\npath = \"a\"\nmax_tasks = 5\n",
            "p.toml",
        )
        .unwrap();
        let mut types = placed(&policy, "/cg");
        types[0].mode = Mode::Audit;
        let state = DaemonState {
            pid: 1,
            backend: Backend::KillCompat,
            cgroup2: "/cg".into(),
            types,
        };
        let v = serde_json::to_value(&state).unwrap();
        assert_eq!(v["backend"], "kill-compat");
        assert_eq!(v["types"][0]["mode"], "audit");
        let back: DaemonState = serde_json::from_value(v).unwrap();
        assert_eq!(
            (back.backend, &back.types),
            (Backend::KillCompat, &state.types)
        );
        for (backend, name) in [(Backend::Lsm, "lsm"), (Backend::Kill, "kill")] {
            assert_eq!(serde_json::to_value(backend).unwrap(), name);
        }
        assert_eq!(serde_json::to_value(Mode::Enforce).unwrap(), "enforce");
    }
}
