//! The Debian package (`cargo xtask package`): lintian finds nothing, it holds what the README
//! promises, and its maintainer scripts do what they say on this host's kernel: `postrm purge`
//! removes the pinned enforcer and waits until the kernel ran its programs for the last time,
//! and `postinst` migrates across a map layout change. The scripts run from the built package,
//! with deb-systemd-helper, deb-systemd-invoke and systemctl replaced by stubs that record their
//! calls (the host's systemd state is not theirs to change). Installing it for real, in a
//! systemd guest, is the vm-test's part. Host only: the qemu guests skip these.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use spawnguard_tests::*;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The package `cargo xtask package` built (`SPAWNGUARD_DEB`, else next to `SPAWNGUARD_BIN`'s
/// target directory), or `None` (a failure under `CI=true`).
fn deb() -> Option<PathBuf> {
    let deb = std::env::var_os("SPAWNGUARD_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let bin = spawnguard_bin();
            let target = bin
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."));
            target.join(format!("debian/spawnguard_{VERSION}-1_amd64.deb"))
        });
    if deb.is_file() {
        return Some(deb);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "no package at {} (cargo xtask package), and CI=true",
        deb.display()
    );
    eprintln!(
        "skipped: no package at {} (cargo xtask package)",
        deb.display()
    );
    None
}

fn ok(out: Output, what: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    ok(
        Command::new("dpkg-deb")
            .args(args)
            .arg(deb)
            .output()
            .unwrap(),
        "dpkg-deb",
    )
}

/// A directory of the test's own, removed when it ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sg-pkg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether an ELF file asks for a program interpreter or has a dynamic section (it is not
/// static).
fn is_dynamic(elf: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let p_type = u32::from_le_bytes(elf[phoff + i * size..][..4].try_into().unwrap());
        p_type == 3 || p_type == 2 // PT_INTERP, PT_DYNAMIC
    })
}

#[test]
fn the_package_is_lintian_clean_and_holds_what_it_promises() {
    let Some(deb) = deb() else { return };
    // lintian: no error and no warning that is not overridden (with a reason) in the package.
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(&deb)
        .output()
        .expect("run lintian (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !report
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The version is Cargo.toml's.
    let field = |name: &str| {
        dpkg_deb(&["--field"], &deb)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
    };
    assert_eq!(field("Package").as_deref(), Some("spawnguard"));
    assert_eq!(field("Version"), Some(format!("{VERSION}-1")));
    assert_eq!(field("Architecture").as_deref(), Some("amd64"));

    let listing = dpkg_deb(&["--contents"], &deb);
    for file in [
        "./usr/bin/spawnguard",
        "./usr/lib/systemd/system/spawnguard.service",
        "./etc/spawnguard/policy.toml",
        "./usr/share/bash-completion/completions/spawnguard",
        "./usr/share/zsh/vendor-completions/_spawnguard",
        "./usr/share/fish/vendor_completions.d/spawnguard.fish",
        "./usr/share/man/man1/spawnguard.1.gz",
        "./usr/share/man/man1/spawnguard-run.1.gz",
        "./usr/share/man/man1/spawnguard-policy-apply.1.gz",
        "./usr/share/doc/spawnguard/copyright",
        "./usr/share/doc/spawnguard/changelog.Debian.gz",
        "./usr/share/doc/spawnguard/examples/require-spawnguard.conf",
        "./usr/share/lintian/overrides/spawnguard",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {file}"))),
            "{file} is not in the package:\n{listing}"
        );
    }
    let control = TempDir::new("control");
    ok(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(&control.0)
            .output()
            .unwrap(),
        "dpkg-deb --control",
    );
    assert_eq!(
        fs::read_to_string(control.0.join("conffiles")).unwrap(),
        "/etc/spawnguard/policy.toml\n",
        "the policy is the package's one conffile"
    );

    let root = TempDir::new("root");
    ok(
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(&deb)
            .arg(&root.0)
            .output()
            .unwrap(),
        "dpkg-deb --extract",
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The default policy and the unit, as they are in the repository.
    for (installed, source) in [
        (
            "etc/spawnguard/policy.toml",
            "spawnguard-userspace/src/default-policy.toml",
        ),
        (
            "usr/lib/systemd/system/spawnguard.service",
            "deploy/systemd/spawnguard.service",
        ),
    ] {
        assert_eq!(
            fs::read(root.0.join(installed)).unwrap(),
            fs::read(repo.join(source)).unwrap(),
            "{installed} is not {source}"
        );
    }
    // The binary is the static one, and runs.
    let bin = root.0.join("usr/bin/spawnguard");
    assert!(
        !is_dynamic(&fs::read(&bin).unwrap()),
        "the packaged binary is not static"
    );
    let version = ok(
        Command::new(&bin).arg("--version").output().unwrap(),
        "spawnguard --version",
    );
    assert!(
        version.starts_with(&format!("spawnguard {VERSION} (map layout v")),
        "{version}"
    );
    // The man page is one (it names the commands).
    let page = ok(
        Command::new("gzip")
            .arg("-dc")
            .arg(root.0.join("usr/share/man/man1/spawnguard.1.gz"))
            .output()
            .unwrap(),
        "gzip -dc",
    );
    assert!(
        page.starts_with(".ie") || page.contains(".TH spawnguard 1"),
        "{page}"
    );
    assert!(page.contains("spawnguard\\-run(1)"), "{page}");
}

/// The package's maintainer scripts, extracted, with stubs for the systemd helpers first in
/// PATH (each appends its name and arguments to `calls`).
struct Scripts {
    dir: TempDir,
}

impl Scripts {
    fn extract(deb: &Path) -> Self {
        let dir = TempDir::new("scripts");
        ok(
            Command::new("dpkg-deb")
                .arg("--control")
                .arg(deb)
                .arg(dir.0.join("control"))
                .output()
                .unwrap(),
            "dpkg-deb --control",
        );
        let stubs = dir.0.join("stubs");
        fs::create_dir_all(&stubs).unwrap();
        let calls = dir.0.join("calls");
        for name in ["deb-systemd-helper", "deb-systemd-invoke", "systemctl"] {
            let stub = stubs.join(name);
            fs::write(
                &stub,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> {}\nexit 0\n",
                    calls.display()
                ),
            )
            .unwrap();
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            fs::set_permissions(&stub, mode).unwrap();
        }
        Self { dir }
    }

    /// Runs a maintainer script as dpkg would (`sh SCRIPT ARGS`), with the binary under test as
    /// the package's binary.
    fn run(&self, script: &str, args: &[&str]) -> Output {
        let path = format!(
            "{}:{}",
            self.dir.0.join("stubs").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("sh")
            .arg(self.dir.0.join("control").join(script))
            .args(args)
            .env("PATH", path)
            .env("SPAWNGUARD_PKG_TEST_BIN", spawnguard_bin())
            .output()
            .unwrap()
    }

    fn calls(&self) -> String {
        fs::read_to_string(self.dir.0.join("calls")).unwrap_or_default()
    }
}

/// The kernel's symbols of loaded BPF programs named like spawnguard's links.
fn spawnguard_programs(names: &[String]) -> Vec<String> {
    fs::read_to_string("/proc/kallsyms")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|sym| {
            sym.strip_prefix("bpf_prog_")
                .and_then(|rest| rest.split_once('_'))
                .is_some_and(|(_, name)| names.iter().any(|n| n == name))
        })
        .map(str::to_owned)
        .collect()
}

/// Removes the pinned enforcer when a test ends, even when it fails.
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Command::new(spawnguard_bin()).arg("uninstall").output();
    }
}

#[test]
fn purge_removes_the_pinned_enforcer_waits_for_the_kernel_and_gives_back_pids_max() {
    if !privileged() {
        return;
    }
    let Some(deb) = deb() else { return };
    let scripts = Scripts::extract(&deb);
    uninstall();
    let _cleanup = Uninstall;
    let (rel, _tree) = test_type("purge");
    let type_rel = format!("{rel}/t");
    let pids = PidsCgroup::for_instance(&format!("{type_rel}/i"));
    fs::create_dir_all(cgroup2_mount().join(&type_rel).join("i")).unwrap();
    let max = || fs::read_to_string(pids.dir.join("pids.max")).unwrap_or_default();
    assert_eq!(max().trim(), "max");
    let mut daemon = Daemon::start_pinned(&policy("pg", &type_rel, "max_tasks = 30")).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || max().trim() == "30"),
        "the backstop wrote no pids.max: {}",
        max()
    );
    // What `apt remove` leaves: the daemon stopped (prerm), the enforcer pinned.
    daemon.stop().unwrap();
    let links = Path::new(PIN_DIR).join("links");
    let names: Vec<String> = fs::read_dir(&links)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().chars().take(15).collect())
        .collect();
    assert!(!names.is_empty());
    assert!(
        !spawnguard_programs(&names).is_empty(),
        "no program is listed in /proc/kallsyms while pinned"
    );

    let out = scripts.run("postrm", &["purge"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "postrm purge failed: {err}");
    // Returned only once the kernel let go of every program: none is left right after.
    assert_eq!(spawnguard_programs(&names), Vec::<String>::new(), "{err}");
    assert!(
        !Path::new("/sys/fs/bpf/spawnguard").exists(),
        "pins left: {err}"
    );
    assert!(
        !Path::new("/run/spawnguard").exists(),
        "/run/spawnguard left"
    );
    assert_eq!(max().trim(), "max", "pids.max was not given back: {err}");
    assert!(err.contains("removed from the kernel"), "{err}");
    assert!(
        scripts
            .calls()
            .contains("deb-systemd-helper purge spawnguard.service"),
        "{}",
        scripts.calls()
    );
    // Plain remove leaves the enforcer: postrm remove touches no pin.
    drop(Daemon::start_pinned(&policy("pg", &type_rel, "max_tasks = 30")).unwrap());
    let out = scripts.run("postrm", &["remove"]);
    assert!(out.status.success());
    assert!(links.exists(), "postrm remove removed the enforcer");
}

#[test]
fn an_upgrade_across_a_map_layout_change_migrates_to_the_new_enforcer() {
    if !privileged() {
        return;
    }
    let Some(deb) = deb() else { return };
    let scripts = Scripts::extract(&deb);
    uninstall();
    let _cleanup = Uninstall;
    let (rel, _tree) = test_type("migrate");
    let text = policy("mg", &rel, "max_tasks = 30");
    // An enforcer of this layout pinned beside one of an older layout (an empty pin directory
    // is all a daemon needs to see to refuse).
    drop(Daemon::start_pinned(&text).unwrap());
    let old = Path::new("/sys/fs/bpf/spawnguard/v1");
    fs::create_dir(old).unwrap();
    let refused = Command::new("timeout")
        .arg("60")
        .arg(spawnguard_bin())
        .args(["run", "--metrics-listen", "off"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a daemon adopted another layout");

    // Same layout: nothing to migrate, nothing removed.
    fs::remove_dir(old).unwrap();
    let out = scripts.run("postinst", &["configure", VERSION]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        Path::new(PIN_DIR).join("links").exists(),
        "postinst removed the enforcer"
    );
    assert!(
        scripts
            .calls()
            .contains("deb-systemd-helper enable spawnguard.service"),
        "{}",
        scripts.calls()
    );

    // Another layout: postinst (upgrading from an older version) removes it and says for how
    // long nothing was enforced; the new daemon then starts.
    fs::create_dir(old).unwrap();
    let out = scripts.run("postinst", &["configure", "0.0.1-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "postinst failed: {err}");
    assert!(err.contains("(v1 ) found; this version uses v"), "{err}");
    assert!(err.contains("NOT ENFORCING from"), "{err}");
    assert!(
        !Path::new("/sys/fs/bpf/spawnguard").exists(),
        "the old enforcer is left: {err}"
    );
    let mut daemon = Daemon::start_pinned(&text).unwrap();
    assert!(Path::new(PIN_DIR).join("links").exists());
    daemon.stop().unwrap();
}
