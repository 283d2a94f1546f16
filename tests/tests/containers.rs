//! Privileged end-to-end tests with real containers: agents started by podman (Debian's, with
//! runc and the cgroupfs manager) are instances of a type through `--cgroup-parent`, and are
//! held to their budgets, by a daemon on the host and by the spawnguard image run by podman as
//! deploy/README.md documents it. podman's configuration and storage are the tests' own
//! (tests/podman/, target/podman); images are built `FROM scratch` from static binaries.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use spawnguard_tests::{podman::*, *};

/// Per container: the agent's processes plus room for runc, whose init process runs several
/// threads while it sets a container up or joins one for `exec` (a budget of 6 could not start
/// a container on a 2-CPU host; 8 could).
const MAX_TASKS: usize = 16;
const MAX_INSTANCES: u64 = 2;

fn container_policy(name: &str, t: &ContainerType) -> String {
    policy(
        name,
        &t.rel,
        &format!("max_tasks = {MAX_TASKS}\nmax_instances = {MAX_INSTANCES}"),
    )
}

/// A fork bomb inside a container is held at max_tasks, counted from the agent's side: the
/// bomb's processes count themselves in shared memory at their first line of code (`ran=`, the
/// most that ran at once), and the kernel's side is sampled from `cgroup.threads`.
fn fork_bomb_is_held(t: &ContainerType, type_name: &str) {
    let start = Instant::now();
    let args = t.run_args(&["--rm"], &["sg-bomb", "fork", "1500", "20000", "500"]);
    let bomb = t
        .podman
        .cmd()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let most = max_held(&t.dir, Duration::from_millis(1800), MAX_TASKS, false);
    let out = bomb.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the bomb container failed ({}): {report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ran = report_value(&report, "ran") as usize;
    assert!(
        ran <= MAX_TASKS,
        "{ran} of the bomb's processes ran at once in the container, max_tasks {MAX_TASKS}"
    );
    assert!(
        ran >= MAX_TASKS / 2,
        "the bomb never pressed on its budget ({report})"
    );
    assert!(
        most <= MAX_TASKS,
        "the container held {most} tasks, max_tasks {MAX_TASKS}"
    );
    let t_status = type_status(type_name);
    assert!(
        t_status["denied"]["max_tasks"].as_u64().unwrap() > 0,
        "{t_status}"
    );
    eprintln!(
        "fork bomb in a container: {} (sampled: at most {most} tasks), {:.1} s",
        report.trim(),
        start.elapsed().as_secs_f64()
    );
}

/// `podman exec` into a container at its budget is refused (the process runc adds to the
/// container is stopped before the command runs) and the count never passes the budget; into
/// a container with room it works. Returns the two containers (they hold for 60 s).
fn exec_at_budget_is_refused(t: &ContainerType) -> (String, String) {
    let full = t.start("full", &["sg-bomb", "fork", "1500", "20000", "60000"]);
    let dir = t.instance_dir(&full);
    assert!(
        wait_for(Duration::from_secs(15), || {
            instance_counts(&dir).0 == MAX_TASKS as u64 && subtree_threads(&dir).len() == MAX_TASKS
        }),
        "the container did not fill its budget: {:?}, {} tasks in its cgroup",
        instance_counts(&dir),
        subtree_threads(&dir).len()
    );
    let sampler = {
        let dir = dir.clone();
        std::thread::spawn(move || max_held(&dir, Duration::from_millis(1500), MAX_TASKS, false))
    };
    let out = t
        .podman
        .output(&["exec", &full, "/bin/sh", "-c", "echo exec-ran"]);
    let most = sampler.join().unwrap();
    eprintln!(
        "podman exec into a container at its budget: exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("exec-ran"),
        "exec into a full container ran its command"
    );
    assert!(
        most <= MAX_TASKS,
        "the container held {most} tasks during the exec, max_tasks {MAX_TASKS}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || instance_counts(&dir).0
            == subtree_threads(&dir).len() as u64),
        "spawnguard counts {:?}, the cgroup lists {}",
        instance_counts(&dir),
        subtree_threads(&dir).len()
    );
    assert_eq!(subtree_threads(&dir).len(), MAX_TASKS);

    let room = t.start("room", &["sg-bomb", "hold", "60000"]);
    let room_dir = t.instance_dir(&room);
    assert!(wait_for(Duration::from_secs(10), || instance_counts(
        &room_dir
    )
    .0 == 1));
    let out = t
        .podman
        .output(&["exec", &room, "/bin/sh", "-c", "echo exec-ran"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("exec-ran"),
        "exec into a container with room failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (full, room)
}

/// With max_instances containers running, the next one does not start: podman reports runc's
/// failure, the command never runs, and `spawnguard gate` says why beforehand.
fn extra_container_is_refused(t: &ContainerType, type_name: &str, short: &str) {
    assert!(
        wait_for(Duration::from_secs(5), || type_status(type_name)
            ["instances"]
            == MAX_INSTANCES),
        "{}",
        type_status(type_name)
    );
    let gate = cli(&["gate", type_name]);
    let why = String::from_utf8_lossy(&gate.stdout);
    assert_eq!(gate.status.code(), Some(1), "{why}");
    assert!(why.contains("ceiling 2/2"), "{why}");

    let name = t.name(short);
    let args = t.run_args(&["--name", &name], &["/bin/sh", "-c", "echo extra-ran"]);
    let out = t.podman.cmd().args(&args).output().unwrap();
    let state = t
        .podman
        .output(&["inspect", "--format", "{{.State.Status}}", &name]);
    eprintln!(
        "podman run of container {} of a type with max_instances {MAX_INSTANCES}: exit {:?}, \
         stderr: {}; the container is left {}",
        MAX_INSTANCES + 1,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&state.stdout).trim()
    );
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("extra-ran"),
        "the extra container ran"
    );
    let t_status = type_status(type_name);
    assert_eq!(t_status["instances"], MAX_INSTANCES, "{t_status}");
    assert!(
        t_status["denied"]["max_instances"].as_u64().unwrap() >= 1,
        "{t_status}"
    );
}

#[test]
fn containers_are_held_to_their_budgets_by_a_host_daemon() {
    let Some(p) = podman() else { return };
    let start = Instant::now();
    p.agent_image();
    let t = ContainerType::new(p, "podman-host");
    let daemon = Daemon::start(&container_policy("ph", &t), "auto").unwrap();
    fork_bomb_is_held(&t, "ph");
    let _held = exec_at_budget_is_refused(&t);
    extra_container_is_refused(&t, "ph", "third");
    let log = daemon.log_text();
    assert!(log.contains("denied process moving in"), "{log}");
    drop(t);
    eprintln!("{:.1} s", start.elapsed().as_secs_f64());
}

/// Where conmon (podman's per-container monitor) lands with the cgroupfs manager: podman moves
/// it into `PARENT/conmon` (on a unified host a child of the type directory, so one instance of
/// the type for every container's conmon; on a hybrid host only in the v1 hierarchies), unless
/// `--cgroups=no-conmon`, which leaves it where podman runs.
#[test]
fn conmon_stays_out_of_the_type_with_no_conmon() {
    let Some(p) = podman() else { return };
    let t = ContainerType::new(p, "podman-conmon");
    let _daemon = Daemon::start(&policy("pc", &t.rel, "max_tasks = 16"), "auto").unwrap();
    let conmon_of = |name: &str| -> u32 {
        p.ok(&["inspect", "--format", "{{.State.ConmonPid}}", name])
            .parse()
            .unwrap()
    };
    let v1_paths = |pid: u32| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("0::"))
            .filter_map(|l| Some(l.splitn(3, ':').nth(2)?.to_owned()))
            .collect()
    };
    let in_type = |path: &str| path.starts_with(&format!("{}/", t.parent));

    // podman's default, --cgroups=enabled.
    let name = t.name("default");
    let parent = format!("--cgroup-parent={}", t.parent);
    p.ok(&[
        "run",
        "-d",
        "--network=none",
        "--pull=never",
        "--name",
        &name,
        &parent,
        p.agent_image(),
        "sg-bomb",
        "hold",
        "60000",
    ]);
    let conmon = conmon_of(&name);
    let on_v2 = cgroup2_path(conmon);
    let on_v1 = v1_paths(conmon);
    eprintln!("--cgroups=enabled: conmon (pid {conmon}) is at {on_v2} on cgroup2, v1: {on_v1:?}");
    if in_type(&on_v2) {
        // A unified host: conmon's cgroup is a child of the type directory, an instance.
        assert_eq!(on_v2, format!("{}/conmon", t.parent));
        assert!(
            wait_for(Duration::from_secs(5), || type_status("pc")["instances"]
                == 2),
            "conmon's cgroup is not counted as an instance: {}",
            type_status("pc")
        );
    } else {
        // A hybrid host: podman made PARENT/conmon in the v1 hierarchies only.
        assert!(
            on_v1.is_empty() || on_v1.iter().any(|p| p == &format!("{}/conmon", t.parent)),
            "{on_v1:?}"
        );
        assert!(wait_for(Duration::from_secs(5), || type_status("pc")
            ["instances"]
            == 1));
    }

    // --cgroups=no-conmon: conmon stays where podman runs, on every hierarchy.
    let name = t.start("no-conmon", &["sg-bomb", "hold", "60000"]);
    let conmon = conmon_of(&name);
    let on_v2 = cgroup2_path(conmon);
    let on_v1 = v1_paths(conmon);
    eprintln!("--cgroups=no-conmon: conmon (pid {conmon}) is at {on_v2} on cgroup2, v1: {on_v1:?}");
    assert!(!in_type(&on_v2), "{on_v2}");
    assert!(!on_v1.iter().any(|p| in_type(p)), "{on_v1:?}");
    let ctr = cgroup2_path(t.pid(&name));
    assert!(
        ctr.starts_with(&format!("{}/libpod-", t.parent)),
        "the container itself is an instance of the type: {ctr}"
    );
}

/// The spawnguard image, run by podman with the line deploy/README.md gives, stopped and
/// removed (and the enforcer uninstalled) on drop.
struct ImageDaemon {
    podman: &'static Podman,
    name: String,
}

impl ImageDaemon {
    fn start(p: &'static Podman, policy_file: &Path) -> Self {
        uninstall();
        std::fs::create_dir_all("/run/spawnguard").unwrap();
        let name = format!("sg-daemon-{}", std::process::id());
        let _ = p.output(&["rm", "-f", "-t", "0", "--ignore", &name]);
        let args = image_run_args(&name, policy_file.to_str().unwrap(), p.spawnguard_image());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        p.ok(&refs);
        let d = Self { podman: p, name };
        d.wait_ready(0);
        d
    }

    fn pid(&self) -> u32 {
        self.podman
            .ok(&["inspect", "--format", "{{.State.Pid}}", &self.name])
            .parse()
            .unwrap_or(0)
    }

    /// Waits until the daemon in the container (a pid other than `old`) has written its state.
    fn wait_ready(&self, old: u32) -> u32 {
        let mut pid = 0;
        let ready = wait_for(Duration::from_secs(120), || {
            pid = self.pid();
            let state = std::fs::read_to_string("/run/spawnguard/state.json").unwrap_or_default();
            pid != 0
                && pid != old
                && serde_json::from_str::<serde_json::Value>(&state)
                    .is_ok_and(|v| v["pid"].as_u64() == Some(pid as u64))
        });
        assert!(ready, "the image's daemon did not start: {}", self.log());
        pid
    }

    fn log(&self) -> String {
        let out = self.podman.output(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for ImageDaemon {
    fn drop(&mut self) {
        let _ = self
            .podman
            .output(&["rm", "-f", "-t", "10", "--ignore", &self.name]);
        // Not `uninstall()`, which panics on failure: a panic while unwinding would abort.
        let _ = std::process::Command::new(spawnguard_bin())
            .arg("uninstall")
            .output();
    }
}

#[test]
fn the_spawnguard_image_holds_containers_and_keeps_its_pins_across_podman_restart() {
    let Some(p) = podman() else { return };
    let start = Instant::now();
    p.agent_image();
    p.spawnguard_image();
    let images = start.elapsed();
    let t = ContainerType::new(p, "podman-image");
    let policy_file = write_policy("image", &container_policy("pi", &t));
    let daemon = ImageDaemon::start(p, &policy_file);
    let log = daemon.log();
    // The daemon in the container found the host's cgroup2 mount (on a hybrid host the
    // recursive bind of /sys/fs/cgroup brings /sys/fs/cgroup/unified along).
    assert!(
        log.contains(&format!("at {}:", t.dir.display())),
        "the daemon did not place the type at {}: {log}",
        t.dir.display()
    );

    fork_bomb_is_held(&t, "pi");
    let (full, room) = exec_at_budget_is_refused(&t);
    extra_container_is_refused(&t, "pi", "third");

    // `podman restart`: the daemon stops (SIGTERM; its pins stay in the host's bpffs), starts
    // again in the same container and adopts them with the counts the kernel kept.
    let old = daemon.pid();
    let out = p.output(&["restart", "-t", "10", &daemon.name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = daemon.wait_ready(old);
    let log = daemon.log();
    assert!(
        log.contains("adopted the enforcer pinned at") && log.contains("(counts kept)"),
        "{log}"
    );
    eprintln!(
        "podman restart: daemon pid {old} -> {new}: {}",
        log.lines()
            .find(|l| l.contains("adopted the enforcer"))
            .unwrap_or_default()
    );
    let full_dir = t.instance_dir(&full);
    let room_dir = t.instance_dir(&room);
    assert_eq!(instance_counts(&full_dir).0, MAX_TASKS as u64);
    assert_eq!(instance_counts(&room_dir).0, 1);
    extra_container_is_refused(&t, "pi", "after-restart");
    drop(t);
    drop(daemon);
    eprintln!(
        "images {:.1} s, all {:.1} s",
        images.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

/// deploy/README.md gives the very `podman run` lines these tests run.
#[test]
fn the_guide_shows_the_lines_the_tests_run() {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/README.md"))
            .unwrap();
    // Continuation lines joined, as the shell reads them.
    let joined = guide.replace("\\\n", " ");
    let flat: String = joined.split_whitespace().collect::<Vec<_>>().join(" ");
    let image_line = format!(
        "podman {}",
        image_run_args(
            "spawnguard",
            "/etc/spawnguard/policy.toml",
            "localhost/spawnguard"
        )
        .join(" ")
    );
    assert!(flat.contains(&image_line), "the guide lacks: {image_line}");
    for flag in ["--cgroups=no-conmon", "--cgroup-parent=/agents/coder"] {
        assert!(flat.contains(flag), "the guide lacks {flag}");
    }
}
