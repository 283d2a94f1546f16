//! Every file in tests/policy-corpus is an invalid policy. Each must be rejected with a message
//! that names its location (file:line:column) and the problem; the messages are snapshotted in
//! tests/policy-corpus.snapshot so a change in any of them shows up in review.
//! `UPDATE_SNAPSHOTS=1 cargo test --test policy_corpus` rewrites the snapshot.

use std::{path::Path, process::Command};

#[test]
fn every_invalid_policy_is_rejected_with_location_and_reason() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy-corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} files", files.len());
    let mut snapshot = String::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let out = Command::new(env!("CARGO_BIN_EXE_spawnguard"))
            .args(["policy", "check"])
            .arg(file)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace(&format!("{}/", dir.display()), "");
        assert!(
            err.starts_with(&format!("spawnguard: {name}:")),
            "{name}: the error does not name the file and line: {err}"
        );
        snapshot.push_str(&err);
        snapshot.push('\n');
    }
    let path = dir.with_extension("snapshot");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &snapshot).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        snapshot, expected,
        "policy error messages changed; review and rerun with UPDATE_SNAPSHOTS=1"
    );
}
