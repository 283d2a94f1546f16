//! `cargo xtask setup | build | run | test | bench`: the toolchain and the build live here.
//!
//! The eBPF programs need Debian's rustc + rust-src (rustup cannot fetch rust-src here) and
//! bpf-linker built against LLVM 22; `setup` installs them when missing and is a quick check
//! otherwise. See shared/TOOLCHAIN.md for why.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod package;
mod steps;
mod vm;

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "clang-22",
    "libpolly-22-dev",
    // promtool and a Prometheus server for the metrics tests.
    "prometheus",
    // The vm-test guests: qemu, and busybox and cpio for their initramfs.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    // The Debian package's check (tests/tests/package.rs).
    "lintian",
    // Agents in real containers (tests/tests/containers.rs): podman with runc (crun refuses
    // hybrid cgroup hosts); the guide's Python and Node snippets (tests/tests/guide.rs).
    "podman",
    "runc",
    "python3",
    "nodejs",
    // The venv of the Kubernetes manifests' checkers (PY_VENV below).
    "python3-venv",
    // The systemd guest: its Debian rootfs, packed as a zstd initramfs.
    "mmdebstrap",
    "zstd",
    // `cargo xtask bench --only decisions`: a load generator nobody here wrote.
    "stress-ng",
];
/// The checkers of deploy/kubernetes (tests/tests/kubernetes.rs), from PyPI at pinned versions,
/// in a venv of Debian's python3 at a fixed path (`PY_VENV/bin/kubernetes-validate`,
/// `.../yamllint`). kubernetes-validate bundles the schemas, so validation works offline.
const PY_VENV: &str = "/opt/spawnguard-py";
const PY_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0", "yamllint==1.38.0"];
/// The oldest kubectl whose kustomize renders deploy/kubernetes (Debian's kubernetes-client
/// 1.20 is too old). These machines carry 1.32 at /usr/bin/kubectl.
const KUBECTL_MIN_MINOR: u32 = 27;
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian's rustc and rust-src, LLVM 22, bpf-linker, Prometheus,
    /// qemu, podman and runc, python3 and node, kubernetes-validate and yamllint (a venv); warn
    /// when kubectl is older than 1.27 (`test` fails then).
    Setup,
    /// setup, then build the eBPF object and the `spawnguard` binary (release).
    Build,
    /// Build the Debian package: target/debian/spawnguard_<version>-<revision>_amd64.deb.
    Package {
        /// The Debian revision (another one makes a newer package of the same sources, for
        /// upgrade tests).
        #[arg(long, default_value = "1")]
        revision: String,
    },
    /// build, then run the daemon in the foreground (arguments go to `spawnguard run`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// build, then every test: unit tests and the privileged end-to-end tests.
    Test {
        /// Extra arguments for the end-to-end test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// build, then boot Debian's 5.10, 6.1 and 6.12 kernels in qemu guests and check
    /// spawnguard in each: smoke checks, then the end-to-end suite (part of `test`).
    VmTest {
        /// all, 5.10, 5.10-no-bpf-lsm, 6.1, 6.12 or systemd (the package under systemd, 6.12).
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only the smoke checks, not the end-to-end suite.
        #[arg(long)]
        smoke: bool,
        /// Run only the end-to-end tests whose names contain this (several: comma-separated).
        #[arg(long)]
        filter: Option<String>,
        /// Measure fork/thread/syscall overhead (lsm, kill-compat) in each guest instead of
        /// running the end-to-end suite (TCG: compare ratios within a guest only).
        #[arg(long)]
        bench: bool,
    },
    /// build, then load every backend's programs this kernel can load (never attached) and
    /// compare their verifier steps with tests/verifier-steps.toml; `--record` writes this
    /// kernel's section instead. Loads programs: hold the host lock
    /// (`flock /tmp/sg-host.lock cargo xtask verifier-steps --record`).
    VerifierSteps {
        #[arg(long)]
        record: bool,
    },
    /// build, then measure fork/thread/syscall overhead with and without spawnguard
    /// (`sg-bench` arguments); `--suite-beside-hog [FILTER]` runs the host's end-to-end suite
    /// with `stress-ng --cpu 2` beside it instead.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// build, then the cargo-fuzz targets (fuzz/; ASan, rustup's stable toolchain): each for
    /// `--time`, on its working corpus under target/fuzz/ and its seeds in fuzz/seeds/.
    Fuzz {
        /// How long each target runs: 30s, 5m, 1h.
        #[arg(long, default_value = "1h")]
        time: String,
        /// Only this target (several: repeat); targets: policy, control, btf, events, maps.
        #[arg(long)]
        target: Vec<String>,
    },
    /// Write the Prometheus Operator's PrometheusRule from deploy/prometheus/alerts.yaml (its
    /// groups, word for word), so the two never differ.
    PrometheusRule,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => build(),
        Cmd::Package { revision } => package::package(&revision).map(|_| ()),
        Cmd::Run { args } => {
            build()?;
            let bin = root.join("target/release/spawnguard");
            let mut cmd = Command::new(bin);
            cmd.arg("run").args(args);
            // Become the daemon: signals reach it directly.
            Err(std::os::unix::process::CommandExt::exec(&mut cmd).into())
        }
        Cmd::Test { args } => test(&root, &args),
        Cmd::VmTest {
            kernel,
            smoke,
            filter,
            bench,
        } => {
            build()?;
            if bench {
                build_static("sg-bench")?;
            }
            let e2e = if smoke || bench || !vm::wants_e2e(&kernel) {
                Vec::new()
            } else {
                build_static_e2e()?
            };
            let debs = vm::wants_packages(&kernel)
                .then(guest_packages)
                .transpose()?;
            let guests = vm::GuestRun {
                e2e,
                filter,
                bench,
                debs,
                ..Default::default()
            };
            let (passed, failed) = vm::test(&root, &kernel, &guests)?;
            println!("vm-test: {passed} passed, {failed} failed");
            if failed > 0 {
                bail!("vm-test failed");
            }
            Ok(())
        }
        Cmd::PrometheusRule => prometheus_rule(&root),
        Cmd::Fuzz { time, target } => {
            let seconds = fuzz::parse_time(&time)?;
            build()?;
            let (_, failed) = fuzz::fuzz(&root, &target, seconds)?;
            if failed > 0 {
                bail!("{failed} fuzz targets failed (crash inputs under target/fuzz/artifacts/)");
            }
            Ok(())
        }
        Cmd::VerifierSteps { record } => {
            build()?;
            steps::run(&root, record)
        }
        Cmd::Bench { args } => {
            build()?;
            if args.first().map(String::as_str) == Some("--suite-beside-hog") {
                return suite_beside_hog(&root, &args[1..]);
            }
            run(Command::new(root.join("target/release/sg-bench"))
                .args(args)
                .env("SPAWNGUARD_BIN", root.join("target/release/spawnguard")))
        }
    }
}

/// The PrometheusRule's own part: the groups of alerts.yaml follow under `spec`.
const PROMETHEUS_RULE_HEAD: &str = "\
---
# Generated from deploy/prometheus/alerts.yaml by `cargo xtask prometheus-rule`:
# edit that file and run it (tests/tests/monitoring.rs checks that they agree).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: spawnguard
  namespace: spawnguard
  labels:
    app.kubernetes.io/name: spawnguard
    app.kubernetes.io/component: alert-rules
    # What kube-prometheus' Prometheus selects rules by; kube-prometheus-stack
    # selects `release: <its release name>` unless its
    # ruleSelectorNilUsesHelmValues is false.
    prometheus: k8s
    role: alert-rules
spec:
";

/// Writes deploy/kubernetes/overlays/prometheus-operator/prometheusrule.yaml: the head above,
/// then alerts.yaml from its `groups:` on, indented under `spec`.
fn prometheus_rule(root: &Path) -> Result<()> {
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yaml"))?;
    let start = alerts
        .find("\ngroups:")
        .context("deploy/prometheus/alerts.yaml has no top-level `groups:`")?;
    let mut out = PROMETHEUS_RULE_HEAD.to_owned();
    for line in alerts[start + 1..].lines() {
        if !line.is_empty() {
            out += "  ";
        }
        out += line;
        out += "\n";
    }
    let path = root.join("deploy/kubernetes/overlays/prometheus-operator/prometheusrule.yaml");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, out)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
        .join("bin")
}

fn cargo_tool_installed(name: &str) -> bool {
    let in_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    in_path || cargo_bin_dir().join(name).is_file()
}

/// Where cargo puts what it builds (`CARGO_TARGET_DIR`, else `target/`).
fn target_dir() -> Result<PathBuf> {
    Ok(match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => env::current_dir()?.join("target"),
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    let have_toolchain = Path::new(DEBIAN_RUSTC).exists()
        && Path::new(RUST_SRC).exists()
        && Path::new("/usr/lib/llvm-22/bin/llvm-config").exists()
        && Path::new("/usr/bin/promtool").exists()
        && Path::new("/usr/bin/prometheus").exists()
        && Path::new("/usr/bin/qemu-system-x86_64").exists()
        && Path::new("/bin/busybox").exists()
        && Path::new("/usr/bin/cpio").exists()
        && Path::new("/usr/bin/lintian").exists()
        && Path::new("/usr/bin/podman").exists()
        && Path::new("/usr/sbin/runc").exists()
        && Path::new("/usr/bin/python3").exists()
        && Path::new("/usr/bin/node").exists()
        && Path::new("/usr/bin/mmdebstrap").exists()
        && Path::new("/usr/bin/zstd").exists()
        && Path::new("/usr/share/doc/python3-venv").exists()
        && Path::new("/usr/bin/stress-ng").exists();
    if !have_toolchain {
        if !is_root() {
            bail!(
                "missing Debian packages ({}); run `cargo xtask setup` as root",
                APT_PACKAGES.join(" ")
            );
        }
        eprintln!("xtask: installing {}", APT_PACKAGES.join(" "));
        run(Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(APT_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !cargo_tool_installed("bpf-linker") {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    python_tools()?;
    // Only the tests render deploy/kubernetes: a host that runs spawnguard needs no kubectl.
    if let Err(e) = check_kubectl() {
        eprintln!("xtask: warning: {e:#} (`cargo xtask test` needs it)");
    }
    if !cargo_tool_installed("cargo-fuzz") {
        eprintln!("xtask: installing cargo-fuzz {}", fuzz::CARGO_FUZZ_VERSION);
        run(cargo().args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            fuzz::CARGO_FUZZ_VERSION,
        ]))?;
    }
    if !cargo_tool_installed("cargo-deb") {
        eprintln!("xtask: installing cargo-deb {}", package::CARGO_DEB_VERSION);
        run(cargo().args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            package::CARGO_DEB_VERSION,
        ]))?;
    }
    Ok(())
}

/// The venv of PY_PACKAGES; a marker file in it names what was installed, so the quick check
/// is one read.
fn python_tools() -> Result<()> {
    let marker = Path::new(PY_VENV).join("spawnguard-packages");
    let want = PY_PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|have| have == want) {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "{PY_VENV} lacks {}; run `cargo xtask setup` as root",
            PY_PACKAGES.join(" ")
        );
    }
    eprintln!("xtask: installing {} into {PY_VENV}", PY_PACKAGES.join(" "));
    run(Command::new("/usr/bin/python3").args(["-m", "venv", "--clear", PY_VENV]))?;
    run(Command::new(Path::new(PY_VENV).join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PY_PACKAGES))?;
    std::fs::write(&marker, want).context("writing the venv's marker")?;
    Ok(())
}

/// kubectl (its kustomize renders deploy/kubernetes) at least 1.KUBECTL_MIN_MINOR.
fn check_kubectl() -> Result<()> {
    let out = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .context(
            "running kubectl: deploy/kubernetes' tests need kubectl 1.27 or newer on the PATH",
        )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = kubectl_minor(&text);
    match minor {
        Some(m) if m >= KUBECTL_MIN_MINOR => Ok(()),
        _ => bail!(
            "kubectl 1.{KUBECTL_MIN_MINOR} or newer is needed to render deploy/kubernetes \
             (its kustomize); found {:?} (Debian's kubernetes-client 1.20 is too old): install a \
             current kubectl at /usr/bin/kubectl",
            text.lines().next().unwrap_or("nothing")
        ),
    }
}

/// "Client Version: v1.32.4-dispatcher" -> 32
fn kubectl_minor(version: &str) -> Option<u32> {
    let v = version
        .lines()
        .find_map(|l| l.strip_prefix("Client Version: v"))?;
    let mut parts = v.split('.');
    (parts.next()? == "1").then_some(())?;
    parts
        .next()?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

fn build() -> Result<()> {
    setup()?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "spawnguard-tests",
        "--bins",
    ]))?;
    build_spawnguard()?;
    build_static_bomb()
}

/// The bomb, static too: the vm-test guests have no shared libraries. A copy stays as
/// `sg-bomb-static` for the container tests' `FROM scratch` image: `cargo test` relinks
/// `sg-bomb` dynamically before the end-to-end suite runs.
fn build_static_bomb() -> Result<()> {
    build_static("sg-bomb")?;
    let release = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release");
    std::fs::copy(release.join("sg-bomb"), release.join("sg-bomb-static"))
        .context("keeping a copy of the static bomb")?;
    Ok(())
}

/// A binary of the tests package, relinked statically for the vm-test guests.
fn build_static(bin: &str) -> Result<()> {
    run(cargo().args([
        "rustc",
        "--release",
        "--package",
        "spawnguard-tests",
        "--bin",
        bin,
        "--",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "relocation-model=static",
    ]))
}

/// The end-to-end test binaries, linked statically for the vm-test guests (built for an explicit
/// target so the static flag reaches only them, in their own directory under `target/`).
/// Returns their paths.
fn build_static_e2e() -> Result<Vec<PathBuf>> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let out = cargo()
        .args([
            "test",
            "--release",
            "--package",
            "spawnguard-tests",
            "--tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
            "--target",
            TARGET,
        ])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the static end-to-end tests")?;
    if !out.status.success() {
        bail!("building the static end-to-end tests failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true {
            if let Some(exe) = msg["executable"].as_str() {
                tests.push(PathBuf::from(exe));
            }
        }
    }
    if tests.is_empty() {
        bail!("no end-to-end test binaries were built");
    }
    Ok(tests)
}

/// `target/release/spawnguard`, linked statically (glibc included) and not position-independent:
/// one self-contained file to install, and the fastest start (no dynamic loader, no start-up
/// relocations), which `spawnguard gate` needs in a runtime's spawn path (BENCHMARKS.md).
/// `cargo test` relinks it dynamically for the package's own tests; the end-to-end suite runs
/// against this one, so what is tested is what ships.
fn build_spawnguard() -> Result<()> {
    run(cargo().args([
        "rustc",
        "--release",
        "--package",
        "spawnguard-userspace",
        "--bin",
        "spawnguard",
        "--",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "relocation-model=static",
    ]))
}

/// The packages the systemd guest installs: this build, and the same build as a newer version
/// to upgrade to.
fn guest_packages() -> Result<vm::Debs> {
    let dir = target_dir()?.join("vm/debs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Copied out as each is built: cargo deb removes the package's earlier builds from
    // target/debian/.
    let build = |revision| -> Result<(PathBuf, PathBuf)> {
        let built = package::package(revision)?;
        let copy = dir.join(built.file_name().context("a package file name")?);
        std::fs::copy(&built, &copy)?;
        Ok((built, copy))
    };
    let (built, current) = build("1")?;
    // The same build as revision 2: an upgrade runs everything an upgrade runs (prerm, unpack,
    // postinst's restart).
    let (_, newer) = build("2")?;
    // `cargo xtask package`'s build back where it writes it.
    std::fs::copy(&current, &built)?;
    Ok(vm::Debs { current, newer })
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    build()?;
    check_kubectl()?;
    let mut total = Tally::default();
    // Unit tests (the decision logic, policy, BTF, ...): no privileges needed.
    let unit = run_tests(cargo().args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "spawnguard-tests",
    ]));
    // The fuzz targets, CI_SECONDS each (a crash fails the run and prints its input); not
    // with a test-name filter. Built and run beside the first end-to-end pass, which mostly
    // waits on its bombs and daemons: its assertions wait for states, and it passes beside a
    // CPU hog (`cargo xtask bench --suite-beside-hog`, RELIABILITY.md drill 8).
    let fuzzing = (unit.is_ok() && args.is_empty()).then(|| {
        let root = root.to_owned();
        std::thread::spawn(move || fuzz::fuzz(&root, &[], fuzz::CI_SECONDS))
    });
    // End-to-end: real programs, real cgroups, real bombs. One daemon at a time, so serial.
    // Against the binary that ships (the unit tests' build relinked it).
    // The Debian package of that binary, for tests/tests/package.rs.
    let e2e = unit.as_ref().ok().map(|_| {
        let deb = package::package("1")?;
        run_tests(e2e_suite(root, &[], args).env("SPAWNGUARD_DEB", deb))
    });
    let fuzzed = fuzzing.map(|h| -> Result<Tally> {
        let (passed, failed) = h
            .join()
            .map_err(|_| anyhow::anyhow!("the fuzz thread panicked"))??;
        Ok(Tally { passed, failed })
    });
    let fuzz_failed = match &fuzzed {
        Some(Ok(t)) => t.failed > 0,
        Some(Err(e)) => {
            println!("fuzz could not run: {e:#}");
            true
        }
        None => false,
    };
    // The files whose outcome depends on the kernel programs' counting, against the programs
    // kernels before 5.12 get (emulated atomics), on this host's real CPUs: in the 5.10 guest
    // both vCPUs share one host thread, races are tamer. The files about packaging, manifests,
    // docs, the verifier record, metrics and events, reloads, the service protocol, the socket
    // and the drills (which run at their size once) do not change with the atomics: they run in
    // the first pass only (about 4 minutes).
    let e2e_emulated = e2e.as_ref().map(|_| {
        let mut cmd = e2e_suite(root, EMULATED_PASS_FILES, args);
        cmd.env("SPAWNGUARD_EMULATED_ATOMICS", "1")
            .env("SG_SKIP_CONTAINER_TESTS", "1");
        run_tests(&mut cmd)
    });
    // The same checks on the kernels users run, in qemu guests (not with a test-name filter).
    let vm = (unit.is_ok() && args.is_empty()).then(|| -> Result<Tally> {
        // The e2e build relinked the bomb dynamically; the guests need it static.
        build_static_bomb()?;
        let e2e = build_static_e2e()?;
        // The 5.10 guest is the slowest (emulated atomics under TCG, about 22 min for the whole
        // suite): here it runs its smoke checks and the core-promise files, which keeps CI
        // inside its time. `cargo xtask vm-test --kernel 5.10` runs its whole suite; the host's
        // emulated-atomics pass runs the whole suite against the same programs.
        let guests = vm::GuestRun {
            e2e,
            debs: Some(guest_packages()?),
            core_only: vec!["5.10"],
            ..Default::default()
        };
        let (passed, failed) = vm::test(root, "all", &guests)?;
        Ok(Tally { passed, failed })
    });
    let vm_failed = match &vm {
        Some(Ok(t)) => t.failed > 0,
        Some(Err(e)) => {
            println!("vm-test could not run: {e:#}");
            true
        }
        None => false,
    };
    for t in [
        Some(&unit),
        fuzzed.as_ref(),
        e2e.as_ref(),
        e2e_emulated.as_ref(),
        vm.as_ref(),
    ]
    .into_iter()
    .flatten()
    .flatten()
    {
        total.passed += t.passed;
        total.failed += t.failed;
    }
    if let Some((p, f)) = FAILED_TALLY.with(|t| t.borrow_mut().take()) {
        total.passed += p;
        total.failed += f;
    }
    // One closing line for the whole run (cargo prints one per test binary).
    println!(
        "spawnguard: {} passed, {} failed",
        total.passed,
        total.failed
            + u64::from(matches!(vm, Some(Err(_))))
            + u64::from(matches!(fuzzed, Some(Err(_))))
    );
    unit?;
    if fuzz_failed {
        bail!("fuzzing failed (crash inputs under target/fuzz/artifacts/)");
    }
    e2e.unwrap_or_else(|| Ok(Tally::default()))?;
    e2e_emulated.unwrap_or_else(|| Ok(Tally::default()))?;
    if vm_failed {
        bail!("vm-test failed (guest logs in target/vm/)");
    }
    Ok(())
}

/// The end-to-end files the emulated-atomics pass runs again (see `test`).
const EMULATED_PASS_FILES: &[&str] = &[
    "adversarial",
    "breaker",
    "ceilings",
    "control",
    "enforcement",
    "pinning",
];

/// The end-to-end suite (`args`: extra harness arguments, e.g. a filter): real programs, real
/// cgroups, real bombs. One daemon at a time, so serial. Against the binary that ships.
fn e2e_suite(root: &Path, files: &[&str], args: &[String]) -> Command {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "--no-fail-fast",
        "--package",
        "spawnguard-tests",
    ]);
    // Only these files (all when none are given).
    for file in files {
        cmd.args(["--test", file]);
    }
    cmd.args(["--", "--test-threads=1"])
        .args(args)
        .env("SPAWNGUARD_BIN", root.join("target/release/spawnguard"));
    cmd
}

/// `cargo xtask bench --suite-beside-hog [FILTER...]`: the host's end-to-end suite (its first
/// pass, as CI runs it) with `stress-ng --cpu 2` beside it the whole time: the suite's
/// assertions wait for states, not times, so a busy machine must not fail them. Prints the
/// tally and the time; too long for CI (the suite alone takes about 10 minutes).
fn suite_beside_hog(root: &Path, args: &[String]) -> Result<()> {
    /// Ends the hog (by its PID: only the process this started) however the run ends.
    struct Hog(std::process::Child);
    impl Drop for Hog {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deb = package::package("1")?;
    let hog = Hog(Command::new("stress-ng")
        // Bounded by itself too, should this process die without its Drop.
        .args(["--cpu", "2", "--timeout", "2h", "--quiet"])
        .spawn()
        .context("starting stress-ng (cargo xtask setup installs it)")?);
    let started = std::time::Instant::now();
    let tally = run_tests(
        e2e_suite(root, &[], args)
            .env("SPAWNGUARD_DEB", deb)
            .env("CI", "true"),
    );
    drop(hog);
    let (passed, failed) = match &tally {
        Ok(t) => (t.passed, t.failed),
        Err(_) => FAILED_TALLY
            .with(|t| t.borrow_mut().take())
            .unwrap_or((0, 1)),
    };
    println!(
        "beside stress-ng --cpu 2: {passed} passed, {failed} failed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    tally.map(|_| ())
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

/// Runs a `cargo test`, echoing its output, and adds up its "test result:" lines.
fn run_tests(cmd: &mut Command) -> Result<Tally> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| {
                rest.split(';')
                    .find_map(|p| p.trim().strip_suffix(what))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            tally.passed += count(" passed");
            tally.failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        // Failures still count in the closing line.
        tally.failed = tally.failed.max(1);
        FAILED_TALLY.with(|t| *t.borrow_mut() = Some((tally.passed, tally.failed)));
        bail!("{cmd:?} failed: {status}");
    }
    Ok(tally)
}

thread_local! {
    /// The tally of a run that failed (its Err carries no counts).
    static FAILED_TALLY: std::cell::RefCell<Option<(u64, u64)>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_versions_parse() {
        assert_eq!(
            kubectl_minor("Client Version: v1.32.4-dispatcher\nKustomize Version: v5.5.0"),
            Some(32)
        );
        assert_eq!(kubectl_minor("Client Version: v1.20.15"), Some(20));
        assert_eq!(kubectl_minor("Client Version: v1.27+"), Some(27));
        assert_eq!(kubectl_minor("error: unknown flag"), None);
    }
}
