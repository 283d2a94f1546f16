//! deploy/README.md, the runtime integration guide: its code blocks are the files under
//! deploy/examples/ word for word, and its Python and Node snippets ask `spawnguard gate` before
//! they spawn an agent, run for real against a running daemon.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use spawnguard_tests::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The fenced code blocks of deploy/README.md in `lang`.
fn blocks(lang: &str) -> Vec<String> {
    let guide = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let fence = format!("```{lang}\n");
    guide
        .split(&fence)
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(code, _)| code.to_owned()))
        .collect()
}

#[test]
fn the_guide_shows_the_example_files_word_for_word() {
    for (lang, file) in [
        ("python", "gate.py"),
        ("js", "gate.js"),
        ("toml", "launchers.toml"),
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/examples").join(file)).unwrap();
        assert!(
            blocks(lang).contains(&text),
            "deploy/README.md has no ```{lang} block that is deploy/examples/{file}"
        );
    }
}

#[test]
fn the_launchers_policy_is_valid() {
    if !spawnguard_bin().exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no spawnguard binary, and CI=true"
        );
        return;
    }
    let file = repo().join("deploy/examples/launchers.toml");
    let out = cli(&["policy", "check", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `bin` runs here; under `CI=true` it must.
fn have(bin: &str) -> bool {
    let ok = Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the guide's snippets need {bin} (cargo xtask setup installs it), and CI=true"
        );
        eprintln!("skipped: needs {bin}");
    }
    ok
}

/// `INTERPRETER deploy/examples/FILE TYPE INSTANCE CMD...` with `spawnguard` on PATH.
fn snippet(interpreter: &str, file: &str, args: &[&str]) -> std::process::Output {
    let bin_dir = spawnguard_bin().parent().unwrap().to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    Command::new(interpreter)
        .arg(repo().join("deploy/examples").join(file))
        .args(args)
        .env("PATH", path)
        .output()
        .unwrap()
}

/// With a slot free the snippet starts its command as an instance of the type; with the type
/// at its ceiling it does not start it, and says why.
fn snippet_asks_gate_first(interpreter: &str, file: &str, type_name: &str) {
    if !privileged() || !have(interpreter) {
        return;
    }
    let (rel, _tree) = test_type(&format!("guide-{interpreter}"));
    let _daemon = Daemon::start(
        &policy(type_name, &rel, "max_tasks = 16\nmax_instances = 1"),
        "auto",
    )
    .unwrap();
    let marker: PathBuf =
        std::env::temp_dir().join(format!("sg-guide-{interpreter}-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let write_cgroup = format!("cat /proc/self/cgroup > {}", marker.display());
    let out = snippet(
        interpreter,
        file,
        &[type_name, "first", "sh", "-c", &write_cgroup],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cgroup = std::fs::read_to_string(&marker).unwrap();
    assert!(
        cgroup.contains(&format!("0::/{rel}/first\n")),
        "the agent ran outside its instance: {cgroup}"
    );
    let _ = std::fs::remove_file(&marker);

    // The first instance's slot is free once its last task is reaped.
    assert!(wait_for(Duration::from_secs(10), || type_status(type_name)
        ["instances"]
        == 0));
    let mut holder = exec_bomb(type_name, "holder", &["hold", "30000"])
        .spawn()
        .unwrap();
    let holder_dir = cgroup2_mount().join(&rel).join("holder");
    assert!(wait_for(Duration::from_secs(10), || instance_counts(
        &holder_dir
    )
    .0 == 1
        && type_status(type_name)["instances"] == 1));
    let out = snippet(
        interpreter,
        file,
        &[type_name, "second", "sh", "-c", "echo second-ran"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{interpreter} {file} at the ceiling: exit {:?}, {err}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("not starting second: no: ") && err.contains("ceiling 1/1"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("second-ran"));
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn the_python_snippet_asks_gate_before_spawning() {
    snippet_asks_gate_first("python3", "gate.py", "gpy");
}

#[test]
fn the_node_snippet_asks_gate_before_spawning() {
    snippet_asks_gate_first("node", "gate.js", "gjs");
}
