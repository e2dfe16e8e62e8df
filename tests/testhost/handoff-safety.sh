# Hand-offs that never lose a VM: a streamed snapshot whose reader goes away
# leaves the VM running; `ferry restore -` refuses a taken name or port
# before reading its input, and keeps a bundle it received when the restore
# fails afterwards; `ferry stop` returns only once the VMM has released its
# ports; concurrent forks of one VM all work; a bundle's request for host
# access (live mounts, networking, forwards beyond loopback) needs the user's
# confirmation; template ids cannot name files elsewhere; VM state, sockets
# and bundles are private to their owner.
# timeout: 900
set -euo pipefail
ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
# Who holds a host port, for a failure message.
holders() { echo "listeners: $(ss -ltnpH "sport = :$1" | tr -s ' ' | tr '\n' ';') processes: $(ps -eo pid,ppid,stat,args | grep -E '[f]erry-vmm|[p]asst' | tr -s ' ' | tr '\n' ';') VMs: $(ferry ls --json | jq -c '[.[] | {name, state: .status.state}]')"; }
# expect_code CODE CMD...: CMD must fail within 60 s and print error[CODE];
# its output is left in $out.
expect_code() {
    local code=$1; shift
    if out=$(timeout 60 "$@" 2>&1); then fail "expected $code from: $*"; fi
    echo "$out" | grep -q "error\[$code\]" || fail "expected $code from: $* ; got: $out"
    echo "ok: $code"
}
running() { ferry ls --json | jq -e --arg n "$1" '.[] | select(.name==$n and .status.state=="running")' >/dev/null; }
exists() { ferry ls --json | jq -e --arg n "$1" '.[] | select(.name==$n)' >/dev/null; }
vm_names() { ferry ls --json | jq -r '[.[].name] | sort | join(" ")'; }
# can_bind PORT [ADDR]: whether ADDR:PORT (127.0.0.1 unless given) can be
# bound right now (no SO_REUSEADDR).
can_bind() {
    python3 - "$1" "${2:-127.0.0.1}" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[2], int(sys.argv[1])))
    s.listen(1)
except OSError as e:
    print(e)
    sys.exit(1)
s.close()
PY
}
DATA=$HOME/.local/share/ferry
BUNDLE_MIN=3000000
incoming_count() { if [ -d "$DATA/incoming" ]; then find "$DATA/incoming" -mindepth 1 | wc -l; else echo 0; fi; }

echo "== (a) a streamed snapshot whose reader goes away early"
ferry boot --detach --name web --memory 512 >/dev/null
ferry exec web -- sh -c 'echo state-before > /run/state.txt; echo disk-before > /root/disk.txt; sync'
t0=$(ms)
set +e
timeout 60 ferry snapshot web - 2>/tmp/a.err | head -c $BUNDLE_MIN >/dev/null
rc=${PIPESTATUS[0]}
set -e
elapsed=$(( $(ms) - t0 ))
echo "METRIC broken_stream_return_ms=$elapsed"
cat /tmp/a.err
[ "$rc" != 124 ] || fail "ferry snapshot web - did not return within 60 s of its reader going away"
[ "$rc" != 0 ] || fail "a snapshot whose reader went away must fail"
grep -q "error\[SNAPSHOT_STREAM_BROKEN\]" /tmp/a.err || fail "expected SNAPSHOT_STREAM_BROKEN, got: $(cat /tmp/a.err)"
grep -q "still running" /tmp/a.err || fail "the error must say the VM still runs: $(cat /tmp/a.err)"
running web || fail "web is not running after a broken stream: $(ferry ls)"
[ "$(ferry exec web -- echo ok)" = ok ] || fail "web does not answer after a broken stream"
[ "$(ferry exec web -- cat /run/state.txt)" = state-before ] || fail "web lost its memory state"
[ "$(ferry exec web -- cat /root/disk.txt)" = disk-before ] || fail "web lost its disk"
ls "$DATA/vms/web" | grep -q '\.fifo$' && fail "the snapshot stream's FIFO was left in $DATA/vms/web"
# A reader that never reads at all.
t0=$(ms)
set +e
timeout 60 ferry snapshot web - 2>/tmp/a2.err | true
rc=${PIPESTATUS[0]}
set -e
echo "METRIC closed_stream_return_ms=$(( $(ms) - t0 ))"
[ "$rc" != 124 ] || fail "ferry snapshot web - | true did not return within 60 s"
[ "$rc" != 0 ] || fail "a snapshot into a closed pipe must fail"
grep -q "error\[SNAPSHOT_STREAM_BROKEN\]" /tmp/a2.err || fail "closed pipe: expected SNAPSHOT_STREAM_BROKEN, got: $(cat /tmp/a2.err)"
[ "$(ferry exec web -- cat /run/state.txt)" = state-before ] || fail "web lost its state after a closed pipe"
# The VM is not left paused: a checkpoint and then a real hand-off still work.
ferry snapshot web /root/web.snap --leave-running
[ "$(ferry exec web -- cat /run/state.txt)" = state-before ] || fail "web after a checkpoint"
echo "ok: web survived two broken streams"

echo "== (b) ferry restore - checks the name and ports before reading its input"
names_before=$(vm_names)
incoming_before=$(incoming_count)
# The input is a file: its offset after ferry exits says whether it was read.
{
    expect_code VM_NAME_TAKEN ferry restore - --name web --detach
    off=$(python3 -c 'import os; print(os.lseek(0, 0, os.SEEK_CUR))')
} < /root/web.snap
[ "$off" = 0 ] || fail "a restore refused for its name read $off bytes of its input"
python3 -c 'import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 9191)); s.listen(1); time.sleep(900)' &
holder=$!
for _ in $(seq 1 100); do nc -z 127.0.0.1 9191 && break; sleep 0.1; done
nc -z 127.0.0.1 9191 || fail "the port holder did not start"
{
    expect_code BOOT_PORT_FORWARD_IN_USE ferry restore - --name b1 -p 127.0.0.1:9191:80 --detach
    off=$(python3 -c 'import os; print(os.lseek(0, 0, os.SEEK_CUR))')
} < /root/web.snap
[ "$off" = 0 ] || fail "a restore refused for its port read $off bytes of its input"
# A slow producer: the refusal comes at once, and the producer never gets
# to write its bundle (cat ends with EPIPE when ferry has gone).
slow_refusal() {
    local code=$1; shift
    rm -f /tmp/was-read /tmp/slow.rc /tmp/slow.ms
    ( sleep 6; cat /root/web.snap 2>/dev/null && echo read > /tmp/was-read ) |
        { t0=$(ms); set +e; timeout 60 "$@" >/tmp/slow.out 2>&1; echo $? > /tmp/slow.rc; echo $(( $(ms) - t0 )) > /tmp/slow.ms; } || true
    local rc t
    rc=$(cat /tmp/slow.rc); t=$(cat /tmp/slow.ms)
    echo "METRIC refusal_before_read_ms=$t ($code)"
    [ "$rc" != 0 ] || fail "expected $code from a slow producer: $*"
    grep -q "error\[$code\]" /tmp/slow.out || fail "expected $code from: $* ; got: $(cat /tmp/slow.out)"
    [ "$t" -lt 3000 ] || fail "the $code refusal took $t ms: it waited for the input"
    [ ! -e /tmp/was-read ] || fail "the $code refusal consumed its input"
    echo "ok: $code in $t ms, input untouched"
}
slow_refusal VM_NAME_TAKEN ferry restore - --name web --detach
slow_refusal BOOT_PORT_FORWARD_IN_USE ferry restore - --name b1 -p 127.0.0.1:9191:80 --detach
kill $holder; wait $holder 2>/dev/null || true
[ "$(vm_names)" = "$names_before" ] || fail "refused restores left VMs: $(ferry ls)"
[ "$(incoming_count)" = "$incoming_before" ] || fail "refused restores left files in incoming/: $(ls -la "$DATA/incoming")"

echo "== (b) a restore that fails after reading its input keeps the bundle"
ferry boot --detach --name pub --memory 256 -p 0.0.0.0:8091:80 >/dev/null
ferry exec pub -- sh -c 'echo pub-state > /run/state.txt'
ferry snapshot --thin pub /root/pub.snap
exists pub && fail "the hand-off must remove pub"
expect_code RESTORE_CONFIG_UNCONFIRMED ferry restore - --name pub2 --detach < /root/pub.snap
echo "$out"
kept=$(echo "$out" | grep -o "$DATA/incoming/[^ ]*\.snap" | head -1)
[ -n "$kept" ] || fail "the error does not name a received bundle under $DATA/incoming: $out"
[ -f "$kept" ] || fail "the received bundle $kept does not exist"
cmp -s "$kept" /root/pub.snap || fail "the kept bundle differs from what was sent"
exists pub2 && fail "a refused restore left VM pub2"
ferry restore "$kept" --name pub2 --detach --trust-bundle-config >/dev/null
[ "$(ferry exec pub2 -- cat /run/state.txt)" = pub-state ] || fail "pub2 restored from the kept bundle"
ferry restore "$kept" --name pub3 --detach -p 127.0.0.1:8092:80 >/dev/null
[ "$(ferry exec pub3 -- cat /run/state.txt)" = pub-state ] || fail "pub3 restored from the kept bundle with -p"
ferry ls --json | jq -e '.[] | select(.name=="pub3") | .ports == [{"host_ip":"127.0.0.1","host_port":8092,"guest_port":80}]' >/dev/null \
    || fail "pub3's ports: $(ferry ls --json | jq -c '.[] | select(.name=="pub3") | .ports')"
ferry rm -f pub2 pub3 >/dev/null
echo "ok: kept bundle $kept restored"

echo "== (c) ferry stop returns once the VMM has released its ports"
ferry boot --detach --name port --memory 256 -p 127.0.0.1:8080:8000 >/dev/null
ferry snapshot --thin port /root/port.snap --leave-running
can_bind 8080 >/dev/null && fail "8080 is free while port runs: the check would prove nothing"
ferry stop port >/dev/null
can_bind 8080 || fail "8080 still taken right after ferry stop returned (booted VM)"
ferry rm port >/dev/null
t_all=$(ms)
slowest=0
for i in $(seq 1 50); do
    t0=$(ms)
    ferry restore /root/port.snap --name s$i -p 127.0.0.1:8080:8000 --detach >/dev/null
    can_bind 8080 >/dev/null && fail "cycle $i: 8080 is free while s$i runs"
    ts=$(ms)
    ferry stop s$i >/dev/null
    stop_ms=$(( $(ms) - ts ))
    [ "$stop_ms" -gt "$slowest" ] && slowest=$stop_ms
    err=$(can_bind 8080) || fail "cycle $i: 127.0.0.1:8080 still taken right after ferry stop s$i returned ($err)"
    ferry rm s$i >/dev/null
    echo "cycle $i: restore+stop+rebind in $(( $(ms) - t0 )) ms (stop $stop_ms ms)"
done
echo "METRIC stop_rebind_50_cycles_ms=$(( $(ms) - t_all )) slowest_stop_ms=$slowest"
# A hand-off and a forced removal release the port too.
ferry restore /root/port.snap --name h1 --detach >/dev/null
ferry snapshot --thin h1 /root/h1.snap
can_bind 8080 || fail "8080 still taken right after a hand-off snapshot returned"
ferry restore /root/h1.snap --name h2 --detach >/dev/null
ferry rm -f h2 >/dev/null
can_bind 8080 || fail "8080 still taken right after ferry rm -f returned"
rm -f /root/h1.snap
echo "ok: 50 stop/rebind cycles"

echo "== (d) ten concurrent forks of one VM"
ferry boot --detach --name src --memory 256 >/dev/null
ferry exec src -- sh -c 'echo written-before-forks > /root/before.txt; sync'
t0=$(ms)
for i in $(seq 1 10); do
    ( set +e; ferry fork src --new-name k$i --detach >/tmp/fork$i.out 2>/tmp/fork$i.err; echo $? > /tmp/fork$i.rc ) &
done
wait
echo "METRIC ten_concurrent_forks_ms=$(( $(ms) - t0 ))"
busy=0
for i in $(seq 1 10); do
    rc=$(cat /tmp/fork$i.rc)
    [ "$rc" = 0 ] && continue
    grep -q "error\[VM_BUSY\]" /tmp/fork$i.err || fail "fork k$i failed with another error than VM_BUSY: $(cat /tmp/fork$i.err)"
    busy=$((busy + 1))
    exists k$i && fail "a fork refused with VM_BUSY left VM k$i"
    # Refused while another operation held the VM: it succeeds once it is free.
    ok=""
    for _ in 1 2 3 4 5; do
        if ferry fork src --new-name k$i --detach >/dev/null 2>/tmp/fork$i.err; then ok=1; break; fi
        grep -q "error\[VM_BUSY\]" /tmp/fork$i.err || fail "retried fork k$i: $(cat /tmp/fork$i.err)"
        sleep 1
    done
    [ -n "$ok" ] || fail "fork k$i still VM_BUSY with nothing else running"
done
echo "forks refused with VM_BUSY and retried: $busy"
for i in $(seq 1 10); do
    running k$i || fail "k$i is not running: $(ferry ls)"
    got=$(ferry exec k$i -- cat /root/before.txt) || fail "k$i: its disk does not open"
    [ "$got" = written-before-forks ] || fail "k$i reads '$got'"
    [ "$(ferry exec k$i -- sh -c "echo k$i > /root/mine.txt && sync && cat /root/mine.txt")" = k$i ] || fail "k$i: write+sync"
    [ "$(ferry exec k$i -- hostname)" = k$i ] || fail "k$i: hostname"
done
running src || fail "src is not running after the forks"
[ "$(ferry exec src -- cat /root/before.txt)" = written-before-forks ] || fail "src lost its disk"
[ "$(ferry exec src -- sh -c 'echo src > /root/mine.txt && sync && cat /root/mine.txt')" = src ] || fail "src: write+sync"
[ "$(ferry exec k3 -- cat /root/mine.txt)" = k3 ] || fail "k3 sees another VM's write"
echo "ok: ten concurrent forks"
# Mixed operations on one VM at once: each serializes or is refused as busy.
for op in "snapshot --thin src /root/d1.snap --leave-running" "snapshot --thin src /root/d2.snap --leave-running" \
    "fork src --new-name x1 --detach" "fork src --new-name x2 --detach"; do
    tag=$(echo "$op" | tr -c 'a-z0-9\n' '_' | cut -c1-40)
    ( set +e; ferry $op >/tmp/mix-$tag.out 2>/tmp/mix-$tag.err; echo $? > /tmp/mix-$tag.rc ) &
done
wait
for f in /tmp/mix-*.rc; do
    tag=$(basename "$f" .rc)
    [ "$(cat "$f")" = 0 ] && continue
    grep -q "error\[VM_BUSY\]" "/tmp/$tag.err" || fail "$tag failed with another error than VM_BUSY: $(cat "/tmp/$tag.err")"
    echo "$tag: VM_BUSY"
done
for s in d1 d2; do
    [ -e /root/$s.snap ] || continue
    ferry inspect /root/$s.snap >/dev/null || fail "/root/$s.snap does not inspect"
done
for x in x1 x2; do
    exists $x || continue
    [ "$(ferry exec $x -- cat /root/before.txt)" = written-before-forks ] || fail "$x: disk"
done
[ "$(ferry exec src -- cat /root/mine.txt)" = src ] || fail "src after mixed operations"
ferry ls --json | jq -r '.[].name | select(. != "web")' | xargs ferry rm -f >/dev/null
rm -f /root/d1.snap /root/d2.snap

echo "== (e) host access a bundle asks for must be confirmed"
mkdir -p /srv/share
echo shared-file > /srv/share/f.txt
ferry boot --detach --name cfg --memory 256 --live-mount /srv/share:/mnt/share --net -p 0.0.0.0:8093:80 >/dev/null
[ "$(ferry exec cfg -- cat /mnt/share/f.txt)" = shared-file ] || fail "cfg: live mount"
ferry exec cfg -- sh -c 'echo cfg-state > /run/state.txt'
ferry snapshot --thin cfg /root/cfg.snap
names_before=$(vm_names)
expect_code RESTORE_CONFIG_UNCONFIRMED ferry restore /root/cfg.snap --name c1 --detach
echo "$out"
echo "$out" | grep -q "/srv/share" || fail "the live mount is not listed: $out"
echo "$out" | grep -qi "network" || fail "the networking is not listed: $out"
echo "$out" | grep -q "0.0.0.0:8093" || fail "the forward on 0.0.0.0 is not listed: $out"
expect_code RESTORE_CONFIG_UNCONFIRMED ferry restore /root/cfg.snap --name c1 --detach --live-mount /srv/share --net
echo "$out" | grep -q "0.0.0.0:8093" || fail "the unconfirmed forward is not listed: $out"
echo "$out" | grep -q "/srv/share" && fail "a confirmed live mount is listed: $out"
expect_code RESTORE_CONFIG_UNCONFIRMED ferry restore /root/cfg.snap --name c1 --detach --net -p 0.0.0.0:8093:80
echo "$out" | grep -q "/srv/share" || fail "the unconfirmed live mount is not listed: $out"
expect_code RESTORE_CONFIG_UNCONFIRMED ferry restore /root/cfg.snap --name c1 --detach --live-mount /srv/share -p 0.0.0.0:8093:80
echo "$out" | grep -qi "network" || fail "the unconfirmed networking is not listed: $out"
[ "$(vm_names)" = "$names_before" ] || fail "refused restores left VMs: $(ferry ls)"
pgrep -f "ferry-vmm .*/vms/c1" && fail "a refused restore left a VMM running"
ferry restore /root/cfg.snap --name c1 --detach --live-mount /srv/share --net -p 0.0.0.0:8093:80 >/dev/null
[ "$(ferry exec c1 -- cat /run/state.txt)" = cfg-state ] || fail "c1: state"
[ "$(ferry exec c1 -- cat /mnt/share/f.txt)" = shared-file ] || fail "c1: live mount"
ferry rm -f c1 >/dev/null
err=$(can_bind 8093 0.0.0.0) || fail "0.0.0.0:8093 still taken right after ferry rm -f c1 returned ($err); $(holders 8093)"
out=$(ferry restore /root/cfg.snap --name c2 --detach --trust-bundle-config 2>&1) || fail "restore with --trust-bundle-config: $out; $(holders 8093)"
[ "$(ferry exec c2 -- cat /mnt/share/f.txt)" = shared-file ] || fail "c2: live mount"
ferry ls --json | jq -e '.[] | select(.name=="c2") | .ports[0].host_ip == "0.0.0.0"' >/dev/null || fail "c2: forward"
ferry rm -f c2 >/dev/null
echo "ok: unconfirmed host access refused, confirmed or trusted restores"

echo "== (f) template ids cannot name files elsewhere"
mkdir -p "$HOME/.cache/ferry/templates"
for f in "$HOME/.cache/x.snap" "$HOME/.cache/x.json" "$HOME/.cache/ferry/x.snap" "$HOME/.cache/ferry/x.json" /tmp/x.snap /tmp/x.json; do
    echo keep > "$f"
done
for id in ../../x ../x /tmp/x ../../../../../tmp/x; do
    expect_code TEMPLATE_NOT_FOUND ferry template rm "$id"
done
for f in "$HOME/.cache/x.snap" "$HOME/.cache/x.json" "$HOME/.cache/ferry/x.snap" "$HOME/.cache/ferry/x.json" /tmp/x.snap /tmp/x.json; do
    [ "$(cat "$f" 2>/dev/null)" = keep ] || fail "ferry template rm deleted or changed $f"
done

echo "== (g) VM state, sockets and bundles are private"
mode() { stat -c %a "$1"; }
[ "$(mode "$DATA/vms/web")" = 700 ] || fail "mode of the VM directory: $(mode "$DATA/vms/web") (want 700)"
[ "$(mode "$DATA/vms/web/vm.json")" = 600 ] || fail "mode of vm.json: $(mode "$DATA/vms/web/vm.json") (want 600)"
[ "$(mode "$DATA/vms/web/control.sock")" = 600 ] || fail "mode of control.sock: $(mode "$DATA/vms/web/control.sock") (want 600)"
[ "$(mode /root/web.snap)" = 600 ] || fail "mode of a bundle written by ferry snapshot: $(mode /root/web.snap) (want 600)"
[ "$(mode "$kept")" = 600 ] || fail "mode of a received bundle: $(mode "$kept") (want 600)"
echo "ok: modes"
ferry rm -f web >/dev/null
echo "all handoff-safety tests passed"
