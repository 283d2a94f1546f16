//! Policy reloads: the daemon watches its policy file's directory (so that a Kubernetes
//! ConfigMap's `..data` symlink swap is seen, not only an edit of the file), waits for the
//! directory to be quiet (an editor's half-written file is never read), and asks the policy
//! task to apply the file. The outcome of every reload (watch, SIGHUP, `policy apply`) is kept
//! here for `/metrics`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Quiet time after the last change in the directory before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// What `/metrics` says about reloads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub successes: u64,
    pub failures: u64,
    pub last_successful: bool,
    /// Unix time of the last successful load (the first one is the daemon's start).
    pub last_success_unix: f64,
    /// Hash of the policy text in force.
    pub hash: String,
}

static STATS: Mutex<Stats> = Mutex::new(Stats {
    successes: 0,
    failures: 0,
    last_successful: false,
    last_success_unix: 0.0,
    hash: String::new(),
});

/// The first 16 hex digits of the text's SHA-256: enough to tell policies apart on a dashboard.
pub fn hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn stats_mut() -> std::sync::MutexGuard<'static, Stats> {
    STATS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The policy the daemon started with (a load, not a reload: no count).
pub fn started(text: &str) {
    let mut s = stats_mut();
    s.last_successful = true;
    s.last_success_unix = unix_now();
    s.hash = hash(text);
}

/// A reload that put the policy with this [`hash`] in force.
pub fn succeeded(hash: &str) {
    let mut s = stats_mut();
    s.successes += 1;
    s.last_successful = true;
    s.last_success_unix = unix_now();
    s.hash = hash.to_owned();
}

/// A reload that left the previous policy in force.
pub fn failed() {
    let mut s = stats_mut();
    s.failures += 1;
    s.last_successful = false;
}

pub fn stats() -> Stats {
    stats_mut().clone()
}

/// Watches the directory of `file` and sends one message on `changed` after every burst of
/// changes that concern it, once the directory has been quiet for [`DEBOUNCE`]. The watcher
/// stops when the returned value is dropped.
pub fn watch(file: &Path, changed: mpsc::Sender<()>) -> Result<RecommendedWatcher> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .context("the policy file has no file name")?
        .to_owned();
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => concerns(e, &name),
            // A lost event (queue overflow) may have been ours: look at the file again.
            Err(_) => true,
        };
        if relevant {
            let _ = raw_tx.send(());
        }
    })
    .context("starting the policy file watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    tokio::spawn(debounce(raw_rx, changed));
    Ok(watcher)
}

/// Whether an event in the directory may have changed the policy file: a change of the file
/// itself, or of a ConfigMap's `..data` symlink and the `..<timestamp>` directories behind it.
/// Reads (our own too) are not changes.
fn concerns(event: &notify::Event, name: &OsString) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    event.need_rescan()
        || event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == name || n.as_encoded_bytes().starts_with(b".."))
        })
}

/// Sends one message on `out` per burst of messages on `raw`, after [`DEBOUNCE`] of quiet.
async fn debounce(mut raw: mpsc::UnboundedReceiver<()>, out: mpsc::Sender<()>) {
    while raw.recv().await.is_some() {
        loop {
            match tokio::time::timeout(DEBOUNCE, raw.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        // A full queue already holds a request to look at the file: that is enough.
        if let Err(mpsc::error::TrySendError::Closed(_)) = out.try_send(()) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind};

    #[test]
    fn a_hash_is_stable_and_short() {
        assert_eq!(hash("x"), hash("x"));
        assert_ne!(hash("x"), hash("y"));
        // SHA-256 of the empty string.
        assert_eq!(hash(""), "e3b0c44298fc1c14");
    }

    #[test]
    fn only_changes_to_the_file_or_a_configmap_swap_concern_it() {
        let name = OsString::from("policy.toml");
        let ev = |kind, p: &str| notify::Event::new(kind).add_path(PathBuf::from(p));
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(concerns(&ev(modify, "/etc/sg/policy.toml"), &name));
        assert!(concerns(&ev(modify, "/etc/sg/..data"), &name));
        assert!(concerns(
            &ev(EventKind::Create(CreateKind::Any), "/etc/sg/..2026_12_04"),
            &name
        ));
        assert!(!concerns(&ev(modify, "/etc/sg/other.toml"), &name));
        assert!(!concerns(
            &ev(EventKind::Access(AccessKind::Any), "/etc/sg/policy.toml"),
            &name
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_reload_after_quiet() {
        let (raw_tx, raw_rx) = mpsc::unbounded_channel();
        let (out_tx, mut out_rx) = mpsc::channel(1);
        tokio::spawn(debounce(raw_rx, out_tx));
        // Changes closer together than the debounce: nothing yet.
        for _ in 0..5 {
            raw_tx.send(()).unwrap();
            tokio::time::sleep(DEBOUNCE / 2).await;
            assert!(out_rx.try_recv().is_err());
        }
        tokio::time::sleep(DEBOUNCE).await;
        assert_eq!(out_rx.try_recv(), Ok(()));
        assert!(out_rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_edit_and_a_configmap_swap_are_seen() {
        let dir = std::env::temp_dir().join(format!("sg-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2026_a")).unwrap();
        std::fs::write(dir.join("..2026_a/policy.toml"), "a").unwrap();
        std::os::unix::fs::symlink("..2026_a", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _w = watch(&dir.join("policy.toml"), tx).unwrap();
        // The kubelet's swap: a new directory, a new symlink renamed over `..data`.
        std::fs::create_dir_all(dir.join("..2026_b")).unwrap();
        std::fs::write(dir.join("..2026_b/policy.toml"), "b").unwrap();
        std::os::unix::fs::symlink("..2026_b", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("policy.toml")).unwrap(),
            "b"
        );
        // Reading the file is no change.
        assert!(tokio::time::timeout(DEBOUNCE * 3, rx.recv()).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
