#!/bin/bash
# The systemd guest's checks (`cargo xtask vm-test --kernel systemd`): Debian bookworm with
# systemd 252 as pid 1, the spawnguard package preinstalled in the image (so this boot started
# it like any boot of an installed host). Run by sg-checks.service once the boot is done; each
# check prints `SG-CHECK <name> ok|FAIL <detail>` on the console, then `SG-DONE`. Every wait
# polls a state with a deadline; every bomb is bounded (deadline and cap) and runs in a scope of
# its own (an instance cgroup), stopped at the end.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_PAGER= \
    SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive
unit=spawnguard.service
debs=/root/debs
cg=/sys/fs/cgroup
pins=/sys/fs/bpf/spawnguard
policy=/etc/spawnguard/policy.toml
runtimes="containerd docker podman kubelet"

check() { # name, result (0 = ok), detail
    if [ "$2" = 0 ]; then echo "SG-CHECK $1 ok $3"; else echo "SG-CHECK $1 FAIL $3"; dump; fi
}
dump() { # what a failed check leaves to read
    echo "--- systemctl status $unit"
    timeout 30 systemctl status --no-pager -l "$unit" 2>&1 | tail -25
    echo "--- journal of $unit"
    journalctl -b -u "$unit" --no-pager -o short-monotonic | tail -40
    echo "--- scopes"
    systemd-cgls --no-pager "$cg/agents.slice" 2>&1 | head -40
}
# wait_for SECONDS CMD...: runs CMD every 0.2 s until it succeeds (0) or the time is up (1).
wait_for() {
    local end=$(($(date +%s) + $1))
    shift
    until "$@"; do
        [ "$(date +%s)" -ge "$end" ] && return 1
        sleep 0.2
    done
}
sc() { timeout 300 systemctl "$@"; } # a hung systemctl is a failed check, not a hung guest
prop() { systemctl show -p "$1" --value "${2:-$unit}"; }
secs() { # a systemd time span ("1min 30s") in whole seconds
    systemd-analyze timespan "$1" | sed -n 's/^ *μs: *\([0-9]*\)$/\1/p' | awk '{ print int($1 / 1000000) }'
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
restarted() { # the unit runs again, under another main process than $1
    local pid
    pid=$(prop MainPID)
    [ "$(prop ActiveState)" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$1" ]
}
field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" "$2"; } # NAME, FILE: a count from a bomb's output

# bomb TYPE SCOPE DEADLINE_MS CAP HOLD_MS: a bounded fork bomb started like an agent, by
# `systemd-run --slice=agents-TYPE.slice --scope`: its scope is an instance of the type.
# TasksMax bounds it should spawnguard fail (the guest stays usable); the budgets are far below.
bomb() {
    timeout 600 systemd-run --quiet --collect --slice="agents-$1.slice" --scope --unit="$2" \
        -p TasksMax=100 /usr/local/bin/sg-bomb fork "$3" "$4" "$5"
}
denied() { # TYPE: the type's denials by max_tasks, as spawnguard counted them
    spawnguard status --type "$1" 2>/dev/null |
        sed -n 's/^ *denied by max_tasks: \([0-9]*\)$/\1/p' | grep . || echo 0
}
# held NAME TYPE MAX_TASKS [DETAIL]: a 3 s bomb in a fresh instance of TYPE is held at MAX_TASKS:
# as many processes as the budget ran at once, never more, and every fork beyond it was refused
# by spawnguard (its denials rose by the bomb's failed forks: not by the pids.max backstop, nor
# systemd's TasksMax, which the kernel asks only after the LSM hook).
held() {
    local out=/tmp/bomb-$1.txt rc ran eagain before after
    before=$(denied "$2")
    bomb "$2" "sg-$1" 3000 3000 2000 > "$out" 2>&1
    rc=$?
    after=$(denied "$2")
    ran=$(field ran "$out")
    eagain=$(field eagain "$out")
    [ $rc = 0 ] && [ "$ran" = "$3" ] && [ "${eagain:-0}" -gt 0 ] &&
        [ $((after - before)) = "$eagain" ]
    check "$1" $? "${4:+$4: }bomb in agents-$2.slice/sg-$1.scope exit $rc, $ran processes at once, max_tasks $3, spawnguard denied $((after - before)) ($(cat "$out"))"
}
real_tasks() { # TYPE SCOPE: the tasks (threads included) in the instance's cgroup
    wc -l < "$cg/agents.slice/agents-$1.slice/$2/cgroup.threads" 2>/dev/null || echo gone
}
daemon_tasks() { # TYPE SCOPE: the instance's tasks as `spawnguard status` counts them
    spawnguard status --type "$1" 2>/dev/null |
        awk -v s="$2" '{ n = split($1, p, "/"); if (p[n] == s && $2 == t) print $3 }' t="$1"
}
# The long-lived agents: the daemon's count of each equals its cgroup's real count.
agents="coder:sg-hold1.scope reviewer:sg-hold2.scope"
counts_now=
counts_exact() {
    local a t s real ours ok=0
    counts_now=
    for a in $agents; do
        t=${a%%:*} s=${a#*:}
        real=$(real_tasks "$t" "$s")
        ours=$(daemon_tasks "$t" "$s")
        counts_now="$counts_now $s daemon ${ours:-none} real $real;"
        [ "$real" != gone ] && [ "$ours" = "$real" ] || ok=1
    done
    return $ok
}
# loaded [PINNED_UNDER]: "prog|map|link ID" lines for each object the kernel has loaded (only
# those pinned under PINNED_UNDER, with the programs of pinned links), in three bpftool calls.
loaded() {
    local kind
    for kind in prog map link; do
        bpftool -f "$kind" show 2>/dev/null | awk -v kind="$kind" -v under="${1:-}" '
            /^[0-9]+: / {
                id = $1; sub(":", "", id); prog = ""
                for (i = 2; i < NF; i++) if ($i == "prog") prog = $(i + 1)
                if (under == "") print kind, id
            }
            under != "" && $1 == "pinned" && index($2, under) == 1 {
                print kind, id
                if (prog != "") print "prog", prog
            }'
    done | sort -u
}
left_over() { comm -12 <(echo "$ids") <(loaded); } # of the pins' objects, those still loaded
maps_gone() { [ -z "$(left_over | grep '^map ')" ]; }
# purged NAME: `dpkg --purge` leaves nothing pinned, no program of the pins running, no unit.
purged() {
    local left rc t0
    ids=$(loaded "$pins/")
    # The same question before the purge sees every one of them (the check can fail).
    local seen
    seen=$(left_over | grep -c .)
    t0=$(now_ms)
    timeout 600 dpkg --purge spawnguard < /dev/null > /tmp/purge.txt 2>&1
    rc=$?
    # Programs must be gone when dpkg returns (postrm waits for the kernel); maps go with
    # their last program, a moment later.
    left=$(left_over | grep -v '^map ')
    wait_for 30 maps_gone
    local maps=$?
    [ $rc = 0 ] && [ ! -e "$pins" ] && [ -z "$left" ] && [ $maps = 0 ] && [ -n "$ids" ] &&
        [ "$seen" = "$(echo "$ids" | grep -c .)" ] &&
        [ ! -e /etc/spawnguard ] && [ ! -e /run/spawnguard ] &&
        [ -z "$(systemctl list-unit-files --no-legend "$unit")" ] && ! pgrep -x spawnguard > /dev/null
    check "$1" $? "dpkg --purge exit $rc in $(($(now_ms) - t0)) ms; $pins $([ -e $pins ] && echo present || echo gone); of the pins' $(echo "$ids" | grep -c .) kernel objects ($seen seen loaded before) still loaded: ${left:-none} (maps freed: $([ $maps = 0 ] && echo yes || echo no)); $(tail -3 /tmp/purge.txt | tr '\n' ' ')"
}

echo "SG-BEGIN $(uname -r) $(systemctl --version | head -1) $(dpkg-query -W -f '${Package} ${Version}' spawnguard)"

# --- The boot: the package was installed in the image, so systemd started spawnguard at boot.
# It must have been ready (Type=notify: enforcer attached, policy in force) before any runtime
# ordered after it started.
ready=$(prop ActiveEnterTimestampMonotonic)
order_ok=0 order=
for rt in $runtimes; do
    began=$(prop InactiveExitTimestampMonotonic "$rt.service")
    order="$order $rt +$(((began - ready) / 1000)) ms;"
    prop Before | tr ' ' '\n' | grep -qx "$rt.service" &&
        [ "$ready" -gt 0 ] && [ "$began" -ge "$ready" ] || order_ok=1
done
# The journal says it in the same order: spawnguard's "Started" line before each stand-in's.
journalctl -b -o short-monotonic --no-pager > /tmp/boot.txt
sg_line=$(grep -n "Started $unit\|Started spawnguard" /tmp/boot.txt | head -1 | cut -d: -f1)
for rt in $runtimes; do
    rt_line=$(grep -n "stand-in $rt.service starting" /tmp/boot.txt | head -1 | cut -d: -f1)
    [ -n "$sg_line" ] && [ -n "$rt_line" ] && [ "$sg_line" -lt "$rt_line" ] || order_ok=1
done
check boot-order $order_ok "spawnguard.service ready at $((ready / 1000)) ms of the boot, each runtime's start after it:$order journal: $(grep -m1 "Started spawnguard\|Started $unit" /tmp/boot.txt | cut -c1-100)"
[ $order_ok = 0 ] || grep -E "spawnguard|stand-in" /tmp/boot.txt | head -20

# --- Purge the boot's install; then a fresh `dpkg -i` enables and starts the unit.
purged purge-after-boot
t0=$(now_ms)
timeout 600 dpkg --force-confold -i "$debs/current.deb" < /dev/null > /tmp/install.txt 2>&1
rc=$?
enabled=$(systemctl is-enabled "$unit" 2>&1)
active=$(systemctl is-active "$unit" 2>&1)
[ $rc = 0 ] && [ "$enabled" = enabled ] && [ "$active" = active ]
check install-enabled-running $? "dpkg -i exit $rc in $(($(now_ms) - t0)) ms: $enabled, $active (main pid $(prop MainPID), $(prop StatusText))"
[ $rc = 0 ] || cat /tmp/install.txt

# --- `systemctl start` returns once the enforcer is attached and the policy in force: from no
# enforcer at all (stopped, uninstalled), a bomb forked the moment start returns is held.
cat > "$policy" << 'P'
# vm-test: agents are systemd scopes in a type's slice (systemd-run --slice=... --scope).
[[type]]
name = "coder"
path = "agents.slice/agents-coder.slice"
max_tasks = 10

[[type]]
name = "reviewer"
path = "agents.slice/agents-reviewer.slice"
max_tasks = 6
P
sc stop "$unit"
spawnguard uninstall > /tmp/uninstall.txt 2>&1
uninstall_rc=$?
t0=$(now_ms)
sc start "$unit"
rc=$?
start_ms=$(($(now_ms) - t0))
[ $uninstall_rc = 0 ] && [ $rc = 0 ]
check start-returns-ready $? "stop, uninstall exit $uninstall_rc, start exit $rc after $start_ms ms"
held start-then-bomb coder 10 "forked right after systemctl start returned"

# --- Agents launched by systemd are instances of the slice's type, held to its budgets.
held slice-coder coder 10 "systemd-run --slice=agents-coder.slice --scope"
held slice-reviewer reviewer 6 "systemd-run --slice=agents-reviewer.slice --scope"

# --- `systemctl reload` applies the changed policy, or fails and keeps the one in force.
sed -i 's/^max_tasks = 10$/max_tasks = 7/' "$policy"
t0=$(now_ms)
sc reload "$unit"
rc=$?
check reload-applies $rc "systemctl reload exit $rc in $(($(now_ms) - t0)) ms (coder max_tasks 10 -> 7)"
held reload-new-budget coder 7 "after the reload"
cp "$policy" /tmp/policy.good
printf '\n[[type]]\nname = "broken"\nmax_tasks = "lots"\n' >> "$policy"
sc reload "$unit" > /tmp/reload-bad.txt 2>&1
rc=$?
shown=$(spawnguard policy show 2>&1)
[ $rc != 0 ] && [ "$(systemctl is-active "$unit")" = active ] &&
    echo "$shown" | grep -q '^max_tasks = 7$' && ! echo "$shown" | grep -q broken
check reload-invalid-refused $? "systemctl reload of an invalid file exit $rc, unit $(systemctl is-active "$unit"), policy in force still coder max_tasks 7: $(journalctl -b -u "$unit" -o cat --no-pager | grep -i 'invalid\|error\|lots' | tail -1 | cut -c1-160)"
cp /tmp/policy.good "$policy"

# --- Long-lived agents for the restarts below: 5 processes in one instance, 1 process with
# 3 threads in another (bounded: they hold 15 min at most and are stopped at the end).
systemd-run --quiet --collect --slice=agents-coder.slice --scope --unit=sg-hold1 \
    /usr/local/bin/sg-bomb fork 3000 4 900000 > /dev/null 2>&1 &
systemd-run --quiet --collect --slice=agents-reviewer.slice --scope --unit=sg-hold2 \
    /usr/local/bin/sg-bomb threads 3000 3 900000 > /dev/null 2>&1 &
wait_for 60 sh -c "[ \"\$(wc -l < $cg/agents.slice/agents-coder.slice/sg-hold1.scope/cgroup.threads)\" = 5 ] && [ \"\$(wc -l < $cg/agents.slice/agents-reviewer.slice/sg-hold2.scope/cgroup.threads)\" = 4 ]" 2> /dev/null
wait_for 30 counts_exact
check agents-counted $? "two long-lived agents:$counts_now"

# --- kill -9 of the main process: systemd restarts it, and it adopts the pinned enforcer with
# its counts.
old=$(prop MainPID)
restarts=$(prop NRestarts)
t0=$(now_ms)
kill -9 "$old"
wait_for 180 restarted "$old"
rc=$?
new=$(prop MainPID)
wait_for 30 sh -c "journalctl -b _PID=$new -o cat --no-pager | grep -q adopted"
adopted=$?
wait_for 30 counts_exact
exact=$?
[ $rc = 0 ] && [ $adopted = 0 ] && [ $exact = 0 ] && [ "$(prop NRestarts)" -gt "$restarts" ]
check kill9-restart-adopts $? "pid $old killed, pid $new ready after $(($(now_ms) - t0)) ms, NRestarts $restarts -> $(prop NRestarts); journal: $(journalctl -b _PID=$new -o cat --no-pager | grep adopted | head -1 | cut -c1-120); counts:$counts_now"
held after-kill9 coder 7 "after the restart"

# --- A starved watchdog (the daemon stopped by SIGSTOP): systemd kills and restarts it.
wd=$(prop WatchdogUSec)
wd_s=$(secs "$wd")
abort_s=$(secs "$(prop TimeoutAbortUSec)")
old=$(prop MainPID)
restarts=$(prop NRestarts)
t0=$(now_ms)
if [ "${wd_s:-0}" -gt 0 ]; then
    kill -STOP "$old"
    # Bounded: the watchdog's period, the abort's timeout, and a start under TCG.
    wait_for $((wd_s + abort_s + 180)) restarted "$old"
    rc=$?
else
    rc=1
fi
new=$(prop MainPID)
wait_for 30 counts_exact
exact=$?
journalctl -b -u "$unit" -o cat --no-pager | grep -qi "watchdog timeout"
said=$?
[ $rc = 0 ] && [ $said = 0 ] && [ $exact = 0 ]
check watchdog-restart $? "WatchdogSec $wd (abort timeout ${abort_s:-?} s): pid $old stopped, pid $new ready after $(($(now_ms) - t0)) ms, NRestarts $restarts -> $(prop NRestarts); journal: $(journalctl -b -u "$unit" -o cat --no-pager | grep -i "watchdog timeout" | tail -1); counts:$counts_now"
kill -CONT "$old" 2> /dev/null

# --- `dpkg -i` of a newer build: the daemon restarts into the new binary while a bomb keeps
# forking at its budget; it never gets past it, and the counts stay exact. The bomb runs 240 s:
# an upgrade took 72 s in a quiet run and 109 s on a loaded host, and must end inside it.
before=$(denied coder)
bomb coder sg-upgrade 240000 1000000 2000 > /tmp/bomb-upgrade.txt 2>&1 &
bomb_pid=$!
at_budget() { [ "$(real_tasks coder sg-upgrade.scope)" = 7 ]; }
wait_for 60 at_budget
reached=$?
old=$(prop MainPID)
t0=$(now_ms)
timeout 600 dpkg --force-confold -i "$debs/newer.deb" < /dev/null > /tmp/upgrade.txt 2>&1
rc=$?
wait_for 180 restarted "$old"
up=$?
upgrade_ms=$(($(now_ms) - t0))
# The bomb still forks after the upgrade (the upgrade fit in its window).
[ -d "$cg/agents.slice/agents-coder.slice/sg-upgrade.scope" ]
during=$?
wait_for 30 counts_exact
exact=$?
counts_after=$counts_now
wait "$bomb_pid"
bomb_rc=$?
ran=$(field ran /tmp/bomb-upgrade.txt)
eagain=$(field eagain /tmp/bomb-upgrade.txt)
bomb_denied=$(($(denied coder) - before))
version=$(dpkg-query -W -f '${Version}' spawnguard)
[ $reached = 0 ] && [ $rc = 0 ] && [ $up = 0 ] && [ $during = 0 ] && [ $exact = 0 ] &&
    [ $bomb_rc = 0 ] && [ "$ran" = 7 ] && [ "$bomb_denied" = "$eagain" ] && [ "$version" = "$(dpkg-deb -f "$debs/newer.deb" Version)" ]
check upgrade-keeps-enforcing $? "dpkg -i exit $rc to $version, pid $old -> $(prop MainPID) in $upgrade_ms ms (bomb still forking after it: $([ $during = 0 ] && echo yes || echo no)); bomb exit $bomb_rc, at most $ran processes at once, max_tasks 7, spawnguard denied $bomb_denied ($(cat /tmp/bomb-upgrade.txt)); counts:$counts_after"
[ $rc = 0 ] || cat /tmp/upgrade.txt

# --- Fail closed, opt in: with the package's drop-in, a runtime does not start while no
# enforcer is in the kernel (spawnguard cannot start: its policy file is broken), and starts
# once spawnguard does.
dropin=/etc/systemd/system/docker.service.d/require-spawnguard.conf
install -D -m 0644 /usr/share/doc/spawnguard/examples/require-spawnguard.conf "$dropin"
sc daemon-reload
sc stop docker.service "$unit"
spawnguard uninstall > /dev/null 2>&1
cp /etc/spawnguard/policy.toml /tmp/policy.good
echo 'type = [' > /etc/spawnguard/policy.toml
sc start docker.service > /dev/null 2>&1
bad_rc=$?
bad_docker=$(systemctl is-active docker.service)
cp /tmp/policy.good /etc/spawnguard/policy.toml
sc reset-failed "$unit" docker.service > /dev/null 2>&1
sc start docker.service
good_rc=$?
[ $bad_rc != 0 ] && [ "$bad_docker" != active ] && [ $good_rc = 0 ] &&
    [ "$(systemctl is-active docker.service)" = active ] && [ "$(systemctl is-active "$unit")" = active ] &&
    [ -d "$pins" ]
check fail-closed-drop-in $? "require-spawnguard.conf on docker.service: with spawnguard unable to start, start exit $bad_rc ($bad_docker: $(journalctl -b -u docker.service -o cat --no-pager | grep -m1 -i 'no spawnguard enforcer' | cut -c1-100)); once it can, start exit $good_rc, spawnguard $(systemctl is-active "$unit")"
rm -r /etc/systemd/system/docker.service.d
sc daemon-reload

# --- Plain remove stops the daemon; the pinned enforcer stays and holds a new bomb alone (its
# counts read by a copy of the binary: the package's is gone).
cp /usr/bin/spawnguard /usr/local/bin/spawnguard
hash -r # this shell remembered /usr/bin/spawnguard
timeout 600 dpkg -r spawnguard < /dev/null > /tmp/remove.txt 2>&1
rc=$?
[ $rc = 0 ] && [ -d "$pins" ] && [ ! -e /usr/bin/spawnguard ] && ! pgrep -x spawnguard > /dev/null
check remove-keeps-enforcer $? "dpkg -r exit $rc; $pins $([ -d "$pins" ] && echo present || echo gone); daemon $(pgrep -x spawnguard > /dev/null && echo running || echo stopped)"
held remove-holds-alone coder 7 "no daemon, after dpkg -r"

# --- Purge (from the removed state): nothing pinned, no program left.
for a in $agents; do sc stop "${a#*:}" > /dev/null 2>&1; done
purged purge
rm -f /usr/local/bin/spawnguard
echo "SG-DONE"
