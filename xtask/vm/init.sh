#!/bin/busybox sh
# /init of the vm-test guests (`cargo xtask vm-test`): mounts what a host has, then checks
# spawnguard on this kernel. Each check prints `SG-CHECK <name> ok|FAIL <detail>`; the host
# fails the run on any FAIL or a missing `SG-DONE`. Every bomb is bounded (deadline and cap).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /sys/fs/cgroup
mount -t cgroup2 none /sys/fs/cgroup
# Loopback, for /metrics.
ifconfig lo 127.0.0.1 up

check() { # name, condition result (0 = ok), detail
    if [ "$2" = 0 ]; then echo "SG-CHECK $1 ok $3"; else echo "SG-CHECK $1 FAIL $3"; fi
}
expect=$(sed -n 's/.*sg.expect=\([a-z-]*\).*/\1/p' /proc/cmdline)
echo "SG-BEGIN $(uname -r) expect=$expect"

spawnguard doctor > /tmp/doctor.txt; doctor_rc=$?
cat /tmp/doctor.txt
grep -q "^lsm list  *ok" /tmp/doctor.txt; lsm_ok=$?
grep -q "^bpf lsm programs  *ok" /tmp/doctor.txt; probe_ok=$?

if [ "$expect" = "too-old" ]; then
    # A kernel spawnguard cannot run on: doctor says so, run refuses in one sentence.
    [ $doctor_rc != 0 ] && grep -q "^kernel  *FATAL" /tmp/doctor.txt
    check doctor-fatal $? "doctor exit $doctor_rc"
    grep -q "lsm=" /tmp/doctor.txt
    lsm_advice=$?
    if [ $lsm_ok != 0 ]; then
        # Booted without bpf in the LSM list: doctor says how to add it, and the probe fails.
        [ $lsm_advice = 0 ] && [ $probe_ok != 0 ]
        check doctor-lsm-advice $? "lsm list without bpf"
    fi
    spawnguard run > /tmp/run.txt 2>&1; rc=$?
    cat /tmp/run.txt
    [ $rc != 0 ] && grep -q "needs Linux 5.12 or newer" /tmp/run.txt
    check run-refuses $? "run exit $rc"
else
    check doctor-ok $doctor_rc "doctor exit $doctor_rc"
    [ $lsm_ok = 0 ] && [ $probe_ok = 0 ]
    check doctor-lsm-probe $? "bpf in the LSM list and an lsm/task_alloc program attaches"
    grep -q "backend \`auto\` would choose: kill-compat" /tmp/doctor.txt
    check doctor-backend $? "auto picks kill-compat without the kfunc"
    cat > /tmp/p.toml <<P
[[type]]
name = "vm"
path = "agents/vm"
max_tasks = 10
max_threads = 10
P
    spawnguard run --policy /tmp/p.toml --no-pin --metrics-listen 127.0.0.1:9617 > /tmp/d.log 2>&1 &
    i=0
    while [ ! -S /run/spawnguard/control.sock ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
    cat /tmp/d.log
    [ -S /run/spawnguard/control.sock ]
    check daemon-starts $? "the programs load and the daemon serves"
    # Fork bomb: forks for 3 s, then every process holds 3 s more. While they hold, the
    # instance has at most its 10 tasks, and every attempt beyond them was denied.
    spawnguard exec --type vm --instance bomb -- sg-bomb fork 3000 2000 3000 > /tmp/bomb.txt &
    bomb=$!
    sleep 4
    n=$(wc -l < /sys/fs/cgroup/agents/vm/bomb/cgroup.procs)
    [ "$n" -ge 1 ] && [ "$n" -le 10 ]
    check fork-bomb-held $? "$n processes in the instance, max_tasks 10"
    wait $bomb
    cat /tmp/bomb.txt
    spawnguard status > /tmp/status.txt; cat /tmp/status.txt
    denied=$(sed -n 's/.*denied by max_tasks: \([0-9]*\).*/\1/p' /tmp/status.txt)
    [ -n "$denied" ] && [ "$denied" -gt 100 ]
    check fork-bomb-denied $? "denied $denied forks at max_tasks 10 ($(cat /tmp/bomb.txt))"
    # Thread bomb: a refused thread ends its process (kill-compat cannot fail a thread alone).
    spawnguard exec --type vm --instance threads -- sg-bomb threads 2000 200 500
    rc=$?
    [ $rc = 137 ]
    check thread-bomb-killed $? "thread bomb exit $rc (137 = killed at its 11th thread)"
    wget -q -O /tmp/metrics.txt http://127.0.0.1:9617/metrics
    grep -q "^spawnguard_denials_total{reason=\"max_tasks\",type=\"vm\"} [1-9]" /tmp/metrics.txt
    check metrics $? "denials in /metrics"
    spawnguard events --output json > /tmp/events.txt
    grep -q '"kind":"denied".*"reason":"max_tasks"' /tmp/events.txt
    check events $? "a denial in the event stream"
fi
echo "SG-DONE"
poweroff -f
