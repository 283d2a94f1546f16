#!/bin/sh
# Customizes the systemd guest's Debian rootfs (`cargo xtask vm-test --kernel systemd`), once,
# after mmdebstrap built it: part of its cache key, so editing this file rebuilds it.
# $1: the rootfs directory.
set -eu
cd "$1"
sd=etc/systemd/system

# Nothing that slows a TCG boot or runs at a random time: no gettys (the serial console is the
# checks' output), no timers (apt, dpkg backup, fstrim, e2scrub), no pstore or e2scrub reaping.
for unit in getty.target serial-getty@ttyS0.service console-getty.service timers.target \
    e2scrub_reap.service systemd-pstore.service; do
    ln -sf /dev/null "$sd/$unit"
done
ln -sf /lib/systemd/system/multi-user.target "$sd/default.target"
echo sg-systemd > etc/hostname
# A volatile journal (the root is the initramfs): nothing to flush, no disk to wait for.
mkdir -p etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\n' > etc/systemd/journald.conf.d/sg.conf

# Stand-ins for the runtimes spawnguard.service is ordered before: each logs its start, so the
# boot's journal and the units' timestamps show whether spawnguard was ready first.
for rt in containerd docker podman kubelet; do
    cat > "$sd/$rt.service" <<UNIT
[Unit]
Description=stand-in for $rt (vm-test)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/echo "stand-in $rt.service starting"

[Install]
WantedBy=multi-user.target
UNIT
    ln -sf "/$sd/$rt.service" "$sd/multi-user.target.wants/$rt.service"
done

# The checks run once the boot is done, print SG-CHECK lines on the serial console, and power
# the guest off whatever happens (qemu runs with -no-reboot; the host bounds the whole boot).
cat > "$sd/sg-checks.service" <<'UNIT'
[Unit]
Description=spawnguard vm-test checks
After=multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/bin/sg-checks
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
ln -sf "/$sd/sg-checks.service" "$sd/multi-user.target.wants/sg-checks.service"
