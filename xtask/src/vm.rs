//! `cargo xtask vm-test`: spawnguard on the kernels users run, each in a qemu guest (TCG: this
//! machine has no usable KVM). Debian's own kernel packages are fetched with a private apt
//! state (the host's apt configuration and /boot are not touched) and cached under
//! `target/vm/`; the guest boots an initramfs of busybox, the static `spawnguard`, the static
//! bomb and `vm/init.sh`, which prints one `SG-CHECK` line per check and `SG-DONE`. The
//! `systemd` guest boots a Debian rootfs with systemd as pid 1 instead, to check the package
//! and its unit (`systemd.rs`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::run;

mod systemd;
pub use systemd::Debs;

/// What a guest boots into.
#[derive(PartialEq)]
enum Guest {
    /// The busybox initramfs and `vm/init.sh`.
    Busybox,
    /// Debian bookworm with systemd as pid 1, the package installed, `vm/systemd-checks.sh`.
    Systemd,
}

pub struct Kernel {
    pub name: &'static str,
    /// The Debian suite whose `linux-image-amd64` is this kernel.
    suite: &'static str,
    /// What the guest checks: `runs` (smoke checks, then the end-to-end suite with `lsm` and
    /// `kill-compat`) or `no-bpf-lsm` (runs, but `auto` must pick another backend and doctor
    /// say why).
    expect: &'static str,
    /// The kernel command line's LSM list (None: the kernel's default).
    lsm: Option<&'static str>,
    guest: Guest,
}

pub const KERNELS: [Kernel; 5] = [
    // No BPF atomic instructions before 5.12: spawnguard loads its emulated-atomics object here.
    Kernel {
        name: "5.10",
        suite: "bullseye",
        expect: "runs",
        lsm: Some("lockdown,capability,bpf"),
        guest: Guest::Busybox,
    },
    // Booted with its default LSM list, which lacks bpf: doctor must say how to add it and
    // `auto` must pick another backend.
    Kernel {
        name: "5.10-no-bpf-lsm",
        suite: "bullseye",
        expect: "no-bpf-lsm",
        lsm: None,
        guest: Guest::Busybox,
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        expect: "runs",
        lsm: Some("lockdown,capability,bpf"),
        guest: Guest::Busybox,
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
        expect: "runs",
        lsm: Some("lockdown,capability,bpf"),
        guest: Guest::Busybox,
    },
    // The package and its unit under systemd (bookworm's 252) on a real boot.
    Kernel {
        name: "systemd",
        suite: "trixie",
        expect: "systemd",
        lsm: Some("lockdown,capability,bpf"),
        guest: Guest::Systemd,
    },
];

/// Whether the guests `which` names include the systemd guest (it needs the packages built).
pub fn wants_packages(which: &str) -> bool {
    selects(which, Guest::Systemd)
}

/// Whether the guests `which` names include a busybox guest (the end-to-end suite runs there).
pub fn wants_e2e(which: &str) -> bool {
    selects(which, Guest::Busybox)
}

fn selects(which: &str, guest: Guest) -> bool {
    KERNELS
        .iter()
        .any(|k| k.guest == guest && (which == "all" || which == k.name))
}

/// The end-to-end files that hold the core promise (budgets held under attack, zero overshoot):
/// what a guest in `GuestRun::core_only` runs.
pub const CORE_SUITES: [&str; 2] = ["adversarial", "enforcement"];

const INIT: &str = include_str!("../vm/init.sh");
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const BOOT_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// The Debian mirror the host's apt already uses.
fn mirror() -> String {
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    sources
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs:")
                .map(|u| u.trim().to_owned())
                .or_else(|| {
                    l.strip_prefix("deb ")
                        .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
                        .map(str::to_owned)
                })
        })
        .filter(|u| u.contains("/debian") && !u.contains("security"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// `target/vm/kernels/SUITE/vmlinuz`, downloaded and unpacked on first use.
fn fetch_kernel(dir: &Path, k: &Kernel) -> Result<PathBuf> {
    let kdir = dir.join("kernels").join(k.suite);
    let vmlinuz = kdir.join("vmlinuz");
    if vmlinuz.exists() {
        return Ok(vmlinuz);
    }
    let apt = dir.join("apt").join(k.suite);
    fs::create_dir_all(apt.join("lists/partial"))?;
    fs::create_dir_all(apt.join("cache/archives/partial"))?;
    fs::write(
        apt.join("sources.list"),
        format!("deb [signed-by={KEYRING}] {} {} main\n", mirror(), k.suite),
    )?;
    let opts = [
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/dev/null".to_owned(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "Debug::NoLocking=1".to_owned(),
        "APT::Sandbox::User=root".to_owned(),
    ];
    let apt_cmd = |program: &str| {
        let mut c = Command::new(program);
        for o in &opts {
            c.arg("-o").arg(o);
        }
        c.current_dir(&apt);
        c
    };
    eprintln!("xtask: fetching Debian {}'s kernel ({})", k.suite, k.name);
    run(apt_cmd("apt-get").args(["update", "-qq"]))?;
    let depends = apt_cmd("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()?;
    let text = String::from_utf8_lossy(&depends.stdout);
    let package = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("no kernel package behind linux-image-amd64 in {text}"))?
        .to_owned();
    run(apt_cmd("apt-get").args(["download", "-qq", &package]))?;
    let deb = fs::read_dir(&apt)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("{package} was not downloaded"))?;
    fs::create_dir_all(&kdir)?;
    run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-*'",
        deb.display(),
        kdir.display()
    )))?;
    let unpacked = fs::read_dir(kdir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .next()
        .context("no vmlinuz in the kernel package")?;
    fs::rename(unpacked, &vmlinuz)?;
    let _ = fs::remove_file(deb);
    Ok(vmlinuz)
}

/// An initramfs with busybox, the static binaries, the end-to-end test binaries (static) in
/// `/tests` and the guest's /init.
fn initramfs(root: &Path, dir: &Path, guest: &GuestRun) -> Result<PathBuf> {
    let rootfs = dir.join("root");
    let _ = fs::remove_dir_all(&rootfs);
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "tests"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    for t in &guest.e2e {
        // Cargo names them `<test>-<hash>`: the guest reports them by `<test>`.
        let file = t.file_name().unwrap_or_default().to_string_lossy();
        let name = file.rsplit_once('-').map_or(&*file, |(n, _)| n);
        fs::copy(t, rootfs.join("tests").join(name))
            .with_context(|| format!("copying {} into the guest", t.display()))?;
    }
    for (from, name) in [
        (PathBuf::from("/bin/busybox"), "busybox"),
        (root.join("target/release/spawnguard"), "spawnguard"),
        (root.join("target/release/sg-bomb"), "sg-bomb"),
    ]
    .into_iter()
    .chain(
        guest
            .bench
            .then(|| (root.join("target/release/sg-bench"), "sg-bench")),
    ) {
        fs::copy(&from, rootfs.join("bin").join(name))
            .with_context(|| format!("copying {} into the guest", from.display()))?;
    }
    let init = rootfs.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = dir.join("initramfs.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        rootfs.display(),
        image.display()
    )))?;
    Ok(image)
}

/// Boots the guest and returns its console output (terminal escapes removed).
fn boot(dir: &Path, k: &Kernel, vmlinuz: &Path, image: &Path, run: &GuestRun) -> Result<String> {
    let log = dir.join(format!("guest-{}.log", k.name));
    // no_timer_check: under TCG on a busy host the kernel's check of the IO-APIC timer can time
    // out and panic the boot ("IO-APIC + timer doesn't work"), seen on 5.10 beside a bench.
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet no_timer_check sg.expect={}",
        k.expect
    );
    if k.guest == Guest::Systemd {
        append += &format!(" {}", systemd::APPEND);
    }
    if let Some(f) = &run.filter {
        append += &format!(" sg.filter={f}");
    }
    if run.bench {
        append += " sg.bench=1";
    }
    if run.core_only.contains(&k.name) {
        append += &format!(" sg.suites={}", CORE_SUITES.join(","));
    }
    if let Some(lsm) = k.lsm {
        append += &format!(" lsm={lsm}");
    }
    // One host thread for both vCPUs: with multi-threaded TCG a vCPU sometimes ran a stale
    // int3 of the kernel's live patching when a BPF trampoline was detached during forks on
    // the other vCPU ("Oops: int3" in bpf_lsm_task_alloc, kernel 6.12), an emulation artefact.
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max,-la57",
            "-smp",
            "2",
        ])
        .args(["-m", "1G", "-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(image)
        .arg("-append")
        .arg(&append)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let deadline = Instant::now()
        + match k.guest {
            Guest::Busybox => BOOT_TIMEOUT,
            Guest::Systemd => systemd::BOOT_TIMEOUT,
        };
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let raw = fs::read(&log)?;
    Ok(strip_escapes(&String::from_utf8_lossy(&raw)))
}

/// Removes terminal escape sequences and carriage returns from a console log.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// (passed, failed) checks of one guest; a guest that never said `SG-DONE` counts a failure.
fn verdict(name: &str, log: &str) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    for line in log.lines() {
        let Some(rest) = line.split_once("SG-CHECK ").map(|(_, r)| r) else {
            continue;
        };
        let mut words = rest.splitn(3, ' ');
        let (check, result, detail) = (
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        );
        let ok = result == "ok";
        println!(
            "vm-test {name}: {check} ... {} ({detail})",
            if ok { "ok" } else { "FAILED" }
        );
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    if !log.contains("SG-DONE") {
        println!("vm-test {name}: the guest did not finish (see target/vm/guest-{name}.log)");
        failed += 1;
    }
    (passed, failed)
}

/// Runs the guests named by `which` (`all`, or a kernel name); returns (passed, failed).
/// What the guests run besides their smoke checks.
#[derive(Default)]
pub struct GuestRun {
    /// The end-to-end test binaries (static), run in every `runs` guest.
    pub e2e: Vec<PathBuf>,
    /// Only the end-to-end tests whose names contain this.
    pub filter: Option<String>,
    /// Run `sg-bench --only overhead` for lsm and kill-compat instead of the end-to-end suite.
    pub bench: bool,
    /// The packages the systemd guest installs (needed when it is selected).
    pub debs: Option<Debs>,
    /// Guests (by kernel name) that run only the core-promise test files (`CORE_SUITES`) after
    /// their smoke checks: `cargo xtask test` keeps the slowest guest inside CI's time.
    pub core_only: Vec<&'static str>,
}

pub fn test(root: &Path, which: &str, run: &GuestRun) -> Result<(u64, u64)> {
    let selected: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| which == "all" || k.name == which)
        .collect();
    if selected.is_empty() {
        bail!(
            "--kernel {which}: choose all or one of {}",
            KERNELS.map(|k| k.name).join(", ")
        );
    }
    let dir = root.join("target/vm");
    fs::create_dir_all(&dir)?;
    let busybox = selected
        .iter()
        .any(|k| k.guest == Guest::Busybox)
        .then(|| initramfs(root, &dir, run))
        .transpose()?;
    let systemd_image = selected
        .iter()
        .any(|k| k.guest == Guest::Systemd)
        .then(|| {
            let debs = run
                .debs
                .as_ref()
                .context("the systemd guest needs the packages (cargo xtask package)")?;
            systemd::image(root, &dir, debs)
        })
        .transpose()?;
    let kernels = selected
        .iter()
        .map(|k| fetch_kernel(&dir, k))
        .collect::<Result<Vec<_>>>()?;
    // The guests boot side by side: each is one TCG thread, so two long suites (6.1, 6.12)
    // use the machine's two cores and the matrix takes as long as its slowest guest.
    let logs: Vec<(Result<String>, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = selected
            .iter()
            .zip(&kernels)
            .map(|(k, vmlinuz)| {
                let dir = &dir;
                let image = match k.guest {
                    Guest::Busybox => busybox.as_ref(),
                    Guest::Systemd => systemd_image.as_ref(),
                }
                .expect("an image for each selected guest");
                scope.spawn(move || {
                    let started = Instant::now();
                    let log = boot(dir, k, vmlinuz, image, run);
                    (log, started.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a guest's thread panicked"))
            .collect()
    });
    let (mut passed, mut failed) = (0, 0);
    for (k, (log, secs)) in selected.iter().zip(logs) {
        let (p, f) = verdict(k.name, &log?);
        println!("vm-test {}: {p} passed, {f} failed in {secs:.0} s", k.name);
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_escapes_are_stripped_and_checks_counted() {
        let log = "\u{1b}[2J\u{1b}[?25lSG-BEGIN 6.1\r\nSG-CHECK a ok fine\r\nSG-CHECK b FAIL why\nSG-DONE\n";
        let clean = strip_escapes(log);
        assert!(clean.starts_with("SG-BEGIN 6.1\nSG-CHECK a ok fine"));
        assert_eq!(verdict("t", &clean), (1, 1));
        assert_eq!(
            verdict("t", "SG-CHECK a ok x\n"),
            (1, 1),
            "no SG-DONE is a failure"
        );
    }
}
