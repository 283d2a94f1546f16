//! podman for the container tests: Debian's podman with runc and the cgroupfs manager, with a
//! configuration and a storage of the tests' own under `target/podman` (the host's
//! /etc/containers and /var/lib/containers are never read or changed), and images built
//! `FROM scratch` from static binaries: nothing is pulled from a registry.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use crate::{bomb_bin, cgroup2_mount, spawnguard_bin, CgroupTree};

/// The agent image (busybox and the bomb), tagged in the tests' storage.
pub const AGENT_IMAGE: &str = "localhost/sg-agent:test";
/// The spawnguard image built from deploy/container/Containerfile.
pub const SPAWNGUARD_IMAGE: &str = "localhost/spawnguard:test";

pub struct Podman {
    dir: PathBuf,
    conf: PathBuf,
    storage: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// podman for the tests, or None (the test skips) where it cannot run. Under `CI=true` not
/// being able to run is a failure, except in the second host pass (`SG_SKIP_CONTAINER_TESTS=1`,
/// set by `cargo xtask test` for the emulated-atomics pass: these tests are about where runtimes
/// put their processes, which that pass does not change, and the first pass already ran them).
pub fn podman() -> Option<&'static Podman> {
    if std::env::var("SG_SKIP_CONTAINER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: SG_SKIP_CONTAINER_TESTS=1 (the first pass ran the container tests)");
        return None;
    }
    if !crate::privileged() {
        return None;
    }
    static P: OnceLock<Option<Podman>> = OnceLock::new();
    P.get_or_init(|| {
        let have = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !have("podman") || !have("runc") {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the container tests need podman and runc (cargo xtask setup installs them), \
                 and CI=true"
            );
            eprintln!("skipped: needs podman and runc");
            return None;
        }
        Some(Podman::set_up())
    })
    .as_ref()
}

/// `target/` of the running test binary (`target/release/deps/NAME-HASH`).
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SG_PODMAN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map(|t| t.join("podman"))
        .unwrap_or_else(|| repo().join("target/podman"))
}

/// A soft:hard pair no higher than this process's hard limit (runc cannot raise one).
fn ulimit(resource: libc::__rlimit_resource_t, want: u64) -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    unsafe { libc::getrlimit(resource, &mut r) };
    let v = want.min(r.rlim_max);
    format!("{v}:{v}")
}

impl Podman {
    fn set_up() -> Self {
        let dir = target_dir();
        fs::create_dir_all(dir.join("tmp")).unwrap();
        let fill = |template: &str| {
            fs::read_to_string(repo().join("tests/podman").join(template))
                .unwrap()
                .replace("{DIR}", dir.to_str().unwrap())
                .replace("{NOFILE}", &ulimit(libc::RLIMIT_NOFILE, 1024))
                .replace("{NPROC}", &ulimit(libc::RLIMIT_NPROC, 4096))
        };
        let conf = dir.join("containers.conf");
        let storage = dir.join("storage.conf");
        fs::write(&conf, fill("containers.conf")).unwrap();
        fs::write(&storage, fill("storage.conf")).unwrap();
        Self { dir, conf, storage }
    }

    /// `podman` with the tests' configuration and storage.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf)
            .env("CONTAINERS_STORAGE_CONF", &self.storage)
            .stdin(Stdio::null());
        c
    }

    /// `podman ARGS`, output captured.
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// `podman ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A build context directory of our own, holding `files` (source, name in the context).
    fn context(&self, name: &str, files: &[(PathBuf, &str)]) -> PathBuf {
        let ctx = self.dir.join(name);
        let _ = fs::remove_dir_all(&ctx);
        fs::create_dir_all(&ctx).unwrap();
        for (from, to) in files {
            fs::copy(from, ctx.join(to))
                .unwrap_or_else(|e| panic!("copying {} into {name}: {e}", from.display()));
            fs::set_permissions(ctx.join(to), fs::Permissions::from_mode(0o755)).unwrap();
        }
        ctx
    }

    fn build(&self, containerfile: &Path, ctx: &Path, tag: &str) {
        let start = std::time::Instant::now();
        self.ok(&[
            "build",
            "--network=none",
            "--pull=never",
            "-f",
            containerfile.to_str().unwrap(),
            "-t",
            tag,
            ctx.to_str().unwrap(),
        ]);
        eprintln!("built {tag} in {:.1} s", start.elapsed().as_secs_f64());
    }

    /// The agent image, built once per test binary (podman's layer cache in target/podman makes
    /// a rebuild of unchanged files quick).
    pub fn agent_image(&self) -> &'static str {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| {
            let ctx = self.context(
                "agent-image",
                &[
                    (PathBuf::from("/bin/busybox"), "busybox"),
                    (static_bin("sg-bomb", &static_bomb()), "sg-bomb"),
                ],
            );
            self.build(
                &repo().join("tests/podman/Containerfile"),
                &ctx,
                AGENT_IMAGE,
            );
        });
        AGENT_IMAGE
    }

    /// The image of deploy/container/Containerfile: the static daemon and the default policy.
    pub fn spawnguard_image(&self) -> &'static str {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| {
            let ctx = self.context(
                "spawnguard-image",
                &[
                    (static_bin("spawnguard", &spawnguard_bin()), "spawnguard"),
                    (
                        repo().join("spawnguard-userspace/src/default-policy.toml"),
                        "policy.toml",
                    ),
                ],
            );
            self.build(
                &repo().join("deploy/container/Containerfile"),
                &ctx,
                SPAWNGUARD_IMAGE,
            );
        });
        SPAWNGUARD_IMAGE
    }
}

/// Whether an ELF file is linked statically (no program interpreter): a `FROM scratch` image
/// has no dynamic loader or libc.
pub fn is_static(path: &Path) -> bool {
    use object::read::elf::{FileHeader, ProgramHeader};
    let Ok(data) = fs::read(path) else {
        return false;
    };
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(&*data) else {
        return false;
    };
    let Ok(endian) = header.endian() else {
        return false;
    };
    header.program_headers(endian, &*data).is_ok_and(|phs| {
        !phs.iter()
            .any(|p| p.p_type(endian) == object::elf::PT_INTERP)
    })
}

fn static_bin(what: &str, path: &Path) -> PathBuf {
    assert!(
        is_static(path),
        "{} is not linked statically ({what} goes into a FROM scratch image): `cargo xtask build` \
         links it so",
        path.display()
    );
    path.to_path_buf()
}

/// The bomb, linked statically: `SG_STATIC_BOMB_BIN`, else `sg-bomb` when it is static (after
/// `cargo xtask build`), else `sg-bomb-static` beside it (`cargo xtask build` keeps that copy,
/// which `cargo test`'s relink of `sg-bomb` does not touch).
pub fn static_bomb() -> PathBuf {
    if let Some(p) = std::env::var_os("SG_STATIC_BOMB_BIN") {
        return PathBuf::from(p);
    }
    let bomb = bomb_bin();
    if is_static(&bomb) {
        return bomb;
    }
    bomb.with_file_name("sg-bomb-static")
}

/// A type for containers: its directory `spawnguard-test/NAME` on the cgroup2 mount and, on a
/// hybrid host, the directories of that path runc makes in the v1 hierarchies; and the
/// containers the test starts there. On drop the containers are removed, then every process
/// left in those directories is killed and the directories removed.
pub struct ContainerType {
    pub podman: &'static Podman,
    /// Relative to the cgroup2 mount (the policy's `path`).
    pub rel: String,
    /// `--cgroup-parent` for podman's cgroupfs manager: the same path, from the root.
    pub parent: String,
    /// The type directory on the cgroup2 mount.
    pub dir: PathBuf,
    names: std::sync::Mutex<Vec<String>>,
    // Dropped after the containers are removed (`Drop` below): kills and removes what is left.
    _trees: Vec<CgroupTree>,
}

/// The v1 hierarchies' mount points (none on a unified host).
fn v1_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .collect()
}

impl ContainerType {
    pub fn new(podman: &'static Podman, name: &str) -> Self {
        let rel = format!("spawnguard-test/{name}");
        let mut trees = vec![CgroupTree::new(cgroup2_mount().join(&rel))];
        trees.extend(
            v1_mounts()
                .into_iter()
                .map(|m| CgroupTree::new(m.join(&rel))),
        );
        Self {
            podman,
            parent: format!("/{rel}"),
            dir: cgroup2_mount().join(&rel),
            rel,
            names: Default::default(),
            _trees: trees,
        }
    }

    /// A container name of this test (removed on drop).
    pub fn name(&self, short: &str) -> String {
        let name = format!("sg-{}-{short}", self.rel.rsplit('/').next().unwrap());
        let _ = self
            .podman
            .output(&["rm", "-f", "-t", "0", "--ignore", &name]);
        self.names.lock().unwrap().push(name.clone());
        name
    }

    /// `podman run` of an agent as an instance of this type, as deploy/README.md shows it
    /// (`--cgroups=no-conmon --cgroup-parent=PARENT`), plus what this host needs (no network,
    /// nothing pulled), then `extra` and the image and command.
    pub fn run_args(&self, extra: &[&str], cmd: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["run", "--network=none", "--pull=never"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push("--cgroups=no-conmon".into());
        args.push(format!("--cgroup-parent={}", self.parent));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.podman.agent_image().into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        args
    }

    /// `podman run -d --name NAME` of an agent; returns the name once it runs.
    pub fn start(&self, short: &str, cmd: &[&str]) -> String {
        let name = self.name(short);
        let args = self.run_args(&["-d", "--name", &name], cmd);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.podman.ok(&refs);
        name
    }

    /// The instance directory (on the cgroup2 mount) of a running container: runc's
    /// `libpod-ID` under the type directory.
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        let id = self.podman.ok(&["inspect", "--format", "{{.Id}}", name]);
        self.dir.join(format!("libpod-{id}"))
    }

    /// The container's main process (host pid).
    pub fn pid(&self, name: &str) -> u32 {
        self.podman
            .ok(&["inspect", "--format", "{{.State.Pid}}", name])
            .parse()
            .unwrap()
    }
}

impl Drop for ContainerType {
    fn drop(&mut self) {
        let names = self.names.lock().unwrap().clone();
        if !names.is_empty() {
            let mut args = vec!["rm", "-f", "-t", "0", "--ignore"];
            args.extend(names.iter().map(String::as_str));
            let _ = self.podman.output(&args);
        }
        // The trees drop after this: what is left is killed and removed.
    }
}

/// The cgroup2 path (from the hierarchy's root) of a process.
pub fn cgroup2_path(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

/// The `podman run` line deploy/README.md gives for the spawnguard image, with the container
/// NAME, the host's POLICY file and the IMAGE.
pub fn image_run_args(name: &str, policy: &str, image: &str) -> Vec<String> {
    [
        "run",
        "-d",
        "--name",
        name,
        "--privileged",
        "--pid=host",
        "--cgroupns=host",
        "--network=host",
        "-v",
        "/sys/fs/bpf:/sys/fs/bpf:rshared",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup",
        "-v",
        "/sys/kernel/tracing:/sys/kernel/tracing",
        "-v",
        "/sys/kernel/security:/sys/kernel/security",
        "-v",
        "/run/spawnguard:/run/spawnguard",
        "-v",
        &format!("{policy}:/etc/spawnguard/policy.toml:ro"),
        image,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
