//! The systemd guest: Debian bookworm's userspace with systemd 252 as pid 1 on Debian's 6.12
//! kernel, to prove the package and its unit on a real boot. Its root is a Debian rootfs built by
//! `mmdebstrap` from Debian packages, cached under `target/vm/systemd/` and rebuilt only when its
//! recipe (suite, packages, `vm/systemd-rootfs.sh`) changes. Each run copies it, installs the
//! package under test into the copy with `dpkg --root` (so the boot starts it, as on an installed
//! host), adds the checks, the bomb and both packages, and packs it as the initramfs: the kernel
//! unpacks it into its tmpfs root, so the guest needs no disk and none of the kernel's modules
//! (virtio-blk, ext4 and 9p are modules in Debian's kernel, and the harness fetches only vmlinuz).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{mirror, KEYRING};
use crate::run;

const SUITE: &str = "bookworm";
/// minbase, plus: systemd as init, dbus for `systemd-run --scope`, procps (pgrep) and bpftool
/// (which programs the kernel still has after a purge).
const PACKAGES: &str = "systemd-sysv,dbus,procps,bpftool";
const SETUP: &str = include_str!("../../vm/systemd-rootfs.sh");
const CHECKS: &str = include_str!("../../vm/systemd-checks.sh");

/// The packages under test: the one preinstalled and checked, and a newer build of it to
/// upgrade to.
pub struct Debs {
    pub current: PathBuf,
    pub newer: PathBuf,
}

/// About 4 minutes alone on a 2-CPU host, 6 with a third of a CPU (the other guests beside it):
/// a guest that has not powered off by then is stuck.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The kernel command line's systemd part: the image's init is systemd, and its default target
/// runs the checks.
pub const APPEND: &str = "rdinit=/sbin/init";

/// Documentation, manuals and translations are not needed to boot and halve the image; the
/// package's own documentation stays (the checks install its example drop-in).
const DPKG_OPTS: [&str; 5] = [
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/spawnguard/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
];

/// What the cached rootfs was built from: a change of any part rebuilds it.
fn recipe() -> String {
    format!(
        "mmdebstrap --variant=minbase --include={PACKAGES} {} {SUITE}\n{SETUP}",
        DPKG_OPTS.join(" ")
    )
}

/// `target/vm/systemd/rootfs`, built with mmdebstrap when missing or of another recipe.
fn rootfs(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let stamp = dir.join("recipe");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(recipe().as_str()) && rootfs.is_dir() {
        return Ok(rootfs);
    }
    let started = Instant::now();
    eprintln!("xtask: building the systemd guest's Debian {SUITE} rootfs (mmdebstrap)");
    let _ = fs::remove_file(&stamp);
    let fresh = dir.join("rootfs.new");
    for d in [&rootfs, &fresh] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    let mut mm = Command::new("mmdebstrap");
    mm.args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={PACKAGES}"))
        .args(DPKG_OPTS)
        .arg(SUITE)
        .arg(&fresh)
        .arg(format!(
            "deb [signed-by={KEYRING}] {} {SUITE} main",
            mirror()
        ));
    run(&mut mm).context("mmdebstrap (Debian package mmdebstrap)")?;
    let setup = dir.join("systemd-rootfs.sh");
    fs::write(&setup, SETUP)?;
    run(Command::new("sh").arg(&setup).arg(&fresh))?;
    fs::rename(&fresh, &rootfs)?;
    fs::write(&stamp, recipe())?;
    eprintln!(
        "xtask: systemd guest rootfs built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(rootfs)
}

/// The guest's initramfs: the cached rootfs with the package installed, the checks, the bomb and
/// both packages, as a zstd-compressed cpio archive.
pub fn image(root: &Path, vm_dir: &Path, debs: &Debs) -> Result<PathBuf> {
    let dir = vm_dir.join("systemd");
    fs::create_dir_all(&dir)?;
    let base = rootfs(&dir)?;
    let started = Instant::now();
    let tree = dir.join("run");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    // cp -a: ownership, modes, links and device nodes as mmdebstrap made them.
    run(Command::new("cp").arg("-a").arg(&base).arg(&tree))?;
    // Installed like an image builder would (maintainer scripts chrooted into the tree): the
    // postinst enables the unit; it starts at the first boot, ordered before the runtimes.
    run(Command::new("dpkg")
        .arg(format!("--root={}", tree.display()))
        .arg("--install")
        .arg(&debs.current)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing the package into the systemd guest's root")?;
    let put = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dest = tree.join(to);
        fs::create_dir_all(dest.parent().unwrap())?;
        fs::copy(from, &dest)
            .with_context(|| format!("copying {} into the guest", from.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put(
        &root.join("target/release/sg-bomb"),
        "usr/local/bin/sg-bomb",
        0o755,
    )?;
    put(&debs.current, "root/debs/current.deb", 0o644)?;
    put(&debs.newer, "root/debs/newer.deb", 0o644)?;
    let checks = tree.join("usr/local/bin/sg-checks");
    fs::write(&checks, CHECKS)?;
    fs::set_permissions(&checks, fs::Permissions::from_mode(0o755))?;
    let image = dir.join("initramfs.cpio.zst");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | zstd -1 -T0 -q -f -o '{}'",
        tree.display(),
        image.display()
    )))?;
    fs::remove_dir_all(&tree)?;
    eprintln!(
        "xtask: systemd guest image packed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}
