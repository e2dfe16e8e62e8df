# kill -9 anywhere: the ferry process, or the ferry-vmm process involved, is
# killed at moments spread over snapshots (to a file and streamed), forks,
# restores and a bake. After each kill the source VM still runs and answers,
# or lives on in a complete bundle, or (its VMM killed) is stopped with its
# disk intact; a file ferry accepts as a bundle always restores; and after
# `ferry gc` no staging file, FIFO, partial output (in ferry's directories
# or beside a destination), unused disk layer, received bundle or VM of an
# unfinished fork, restore or bake is left; a fork's sibling that runs was
# refreshed (its own hostname); and a killed VMM is reported as a VM that
# stopped, never as a broken control socket.
# timeout: 1200
set -euo pipefail
ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
DATA=$HOME/.local/share/ferry
CACHE=$HOME/.cache/ferry
MEM=256
BAKE_OUT=/root/bake-out/x.tar

# Disk layers (crates/disk/src/layer.rs): which files a VM's root disk
# stands on, which layers no VM uses, and a flattened copy of a VM's disk.
cat > /tmp/layers.py <<'PY'
import os, struct, subprocess, sys
MAGIC = b"FERRYCOW"

def header(path):
    with open(path, "rb") as f:
        h = f.read(4096)
    if h[:8] != MAGIC:
        return None
    _ver, cluster, size, bm_off, bm_len, data_off, plen = struct.unpack_from("<IIQQQQI", h, 8)
    back = h[64:64 + plen].decode()
    if not os.path.isabs(back):
        back = os.path.join(os.path.dirname(path), back)
    return dict(cluster=cluster, size=size, bm_off=bm_off, bm_len=bm_len, data_off=data_off, backing=back)

def chain(path):
    """Files from the top layer down to the raw base; raises if one is missing."""
    out = []
    while True:
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        out.append(path)
        h = header(path)
        if h is None:
            return out
        path = h["backing"]

def vm_disks(data):
    vms = os.path.join(data, "vms")
    for name in sorted(os.listdir(vms)) if os.path.isdir(vms) else []:
        yield name, os.path.join(vms, name, "root.img")

cmd = sys.argv[1]
if cmd == "unused":
    # Layers under DATA/layers that no VM's disk chain reaches.
    data = sys.argv[2]
    used = set()
    for _name, disk in vm_disks(data):
        try:
            used.update(os.path.realpath(p) for p in chain(disk))
        except FileNotFoundError:
            pass
    layers = os.path.join(data, "layers")
    for f in sorted(os.listdir(layers)) if os.path.isdir(layers) else []:
        p = os.path.realpath(os.path.join(layers, f))
        if p not in used:
            print(os.path.join(layers, f))
elif cmd == "broken":
    # VMs (directories with a record) whose root disk, or a file below it, is missing.
    for name, disk in vm_disks(sys.argv[2]):
        if not os.path.exists(os.path.join(os.path.dirname(disk), "vm.json")):
            continue
        if not os.path.exists(disk):
            continue
        try:
            chain(disk)
        except FileNotFoundError as e:
            print(f"{name}: missing {e}")
elif cmd == "nodisk":
    # VM records without a root disk: a creation or removal cut short.
    for name, disk in vm_disks(sys.argv[2]):
        if os.path.exists(os.path.join(os.path.dirname(disk), "vm.json")) and not os.path.exists(disk):
            print(name)
elif cmd == "halfmade":
    # VM directories without a record: a creation that never finished.
    for _name, disk in vm_disks(sys.argv[2]):
        d = os.path.dirname(disk)
        if os.path.isdir(d) and not os.path.exists(os.path.join(d, "vm.json")):
            print(d)
elif cmd == "flatten":
    src, out = sys.argv[2], sys.argv[3]
    files = chain(src)
    subprocess.run(["cp", "--sparse=always", files[-1], out], check=True)
    top = header(files[0])
    with open(out, "r+b") as o:
        o.truncate(top["size"])
        for layer in reversed(files[:-1]):
            h = header(layer)
            c = h["cluster"]
            with open(layer, "rb") as f:
                f.seek(h["bm_off"])
                bits = f.read(h["bm_len"])
                for i in range(min(len(bits) * 8, (h["size"] + c - 1) // c)):
                    if bits[i // 8] & (1 << (i % 8)):
                        f.seek(h["data_off"] + i * c)
                        o.seek(i * c)
                        o.write(f.read(min(c, h["size"] - i * c)))
PY

vmm_pid() { pgrep -f "ferry-vmm $DATA/vms/$1\$" | head -1 || true; }
state() { ferry ls --json | jq -r --arg n "$1" '[.[] | select(.name==$n) | .status.state][0] // "absent"'; }
# What a VM must read back: its disk file and its memory-only file.
answers() {
    local got
    got=$(timeout 30 ferry exec "$1" -- cat /root/before.txt /run/mem.txt 2>/dev/null) || return 1
    [ "$got" = "$(printf '%s\n%s' "disk-$2" "mem-$2")" ]
}
# Waits until NAME's VMM has exited or the VM answers (a killed client's
# VMM may still be finishing the operation).
settle() {
    local deadline=$(( $(date +%s) + 120 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        [ -z "$(vmm_pid "$1")" ] && return 0
        timeout 10 ferry exec "$1" -- true >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "note: $1 neither exited nor answered within 120 s"
}
# disk_intact NAME TAG: the stopped VM's disk, its journal replayed, holds
# the file written before the kill.
disk_intact() {
    local disk=$DATA/vms/$1/root.img got
    [ -e "$disk" ] || { echo "no root disk"; return 1; }
    python3 /tmp/layers.py flatten "$disk" /root/flat.img || { echo "disk chain broken"; rm -f /root/flat.img; return 1; }
    e2fsck -E journal_only -p /root/flat.img >/dev/null 2>&1 || true
    got=$(debugfs -R "cat /root/before.txt" /root/flat.img 2>/dev/null || true)
    rm -f /root/flat.img
    [ "$got" = "disk-$2" ] || { echo "before.txt reads '$got'"; return 1; }
}
# bundle_check FILE TAG: 0 if FILE inspects as a bundle and restores with
# the VM's disk and memory; 1 if ferry does not accept it as a bundle; 2 if
# it is accepted but does not restore intact.
bundle_check() {
    ferry inspect "$1" >/dev/null 2>&1 || return 1
    if ! timeout 300 ferry restore "$1" --name chk --detach >/tmp/chk.out 2>&1; then
        echo "restore of $1: $(cat /tmp/chk.out)"
        ferry rm -f chk >/dev/null 2>&1 || true
        return 2
    fi
    if ! answers chk "$2"; then
        echo "a VM restored from $1 does not read back what was written"
        ferry rm -f chk >/dev/null 2>&1 || true
        return 2
    fi
    ferry rm -f chk >/dev/null
    return 0
}
leftovers() {
    find "$DATA" "$CACHE" \( -name '.*.tmp-*' -o -name '.*.partial-*' -o -name '*.fifo' -o -name '*.part' \) 2>/dev/null | sed 's/^/staging: /'
    # Beside the paths given to ferry snapshot and ferry bake.
    find /root /root/bake-out -maxdepth 1 \( -name '.kp.snap.*' -o -name '.kp-stream.snap.*' -o -name '.x.tar.*' \) 2>/dev/null | sed 's/^/beside a destination: /' || true
    ferry ls --json | jq -r '.[] | select(.name | startswith("bake-")) | "bake VM: \(.name)"'
    python3 /tmp/layers.py unused "$DATA" | sed 's/^/unused layer: /'
    python3 /tmp/layers.py halfmade "$DATA" | sed 's/^/VM directory without vm.json: /'
    [ -d "$DATA/incoming" ] && find "$DATA/incoming" -mindepth 1 | sed 's/^/incoming: /'
    return 0
}
# Back to a clean host for the next kill point (whatever gc did or not).
reset_host() {
    local vms
    vms=$(ferry ls --json | jq -r '.[].name')
    [ -z "$vms" ] || ferry rm -f $vms >/dev/null 2>&1 || true
    ferry ls --json | jq -e 'length == 0' >/dev/null || fail "cannot remove VMs: $(ferry ls)"
    leftovers | sed 's/^[^:]*: //' | xargs -r rm -rf
    rm -f /root/kp.snap /root/kp-stream.snap /root/.kp.snap.* "$BAKE_OUT" /root/bake-out/.x.tar.*
    mkdir -p /root/bake-out
}
new_src() {
    ferry boot --detach --name src --memory $MEM >/dev/null
    ferry exec src -- sh -c "echo disk-$1 > /root/before.txt; sync; echo mem-$1 > /run/mem.txt"
}
# Timing between starting an operation and killing it uses shell builtins
# only: in an emulated test host every new process costs tens of milliseconds.
mkfifo /tmp/sleep.fifo
exec {SLEEPFD}<>/tmp/sleep.fifo
now_ms() { NOW=$(( ${EPOCHREALTIME/./} / 1000 )); }
sleep_until() {
    local left frac
    now_ms
    left=$(( $1 - NOW ))
    [ "$left" -gt 0 ] || return 0
    printf -v frac '%03d' $(( left % 1000 ))
    read -r -t "$(( left / 1000 )).$frac" -u "$SLEEPFD" _ || true
}
# VP: the VMM pid recorded in DIR/pid.json, if any.
read_vmm_pid() {
    local pj=""
    VP=""
    [ -r "$1/pid.json" ] || return 0
    IFS= read -r -d '' pj < "$1/pid.json" || true
    if [[ $pj =~ \"pid\":[[:space:]]*([0-9]+) ]]; then VP=${BASH_REMATCH[1]}; fi
    return 0
}

echo "== setup: a boot template, so sources boot in about a second"
ferry template create --memory $MEM >/dev/null
reset_host

echo "== normal runs, to place the kill points"
new_src m1
t0=$(ms); ferry snapshot src /root/ref.snap; D_snapshot=$(( $(ms) - t0 ))
bundle_check /root/ref.snap m1 || fail "a normal snapshot does not restore"
new_src m2
t0=$(ms); ferry snapshot src - > /root/kp-stream.snap; D_stream=$(( $(ms) - t0 ))
bundle_check /root/kp-stream.snap m2 || fail "a normal streamed snapshot does not restore"
rm -f /root/kp-stream.snap
new_src m3
t0=$(ms); ferry fork src --new-name kid --detach >/dev/null; D_fork=$(( $(ms) - t0 ))
answers kid m3 || fail "a normal fork does not read back"
[ "$(ferry exec kid -- hostname)" = kid ] || fail "a normal fork keeps the source's hostname"
ferry rm -f src kid >/dev/null
t0=$(ms); ferry restore /root/ref.snap --name rr --detach >/dev/null; D_restore=$(( $(ms) - t0 ))
answers rr m1 || fail "a normal restore does not read back"
ferry rm -f rr >/dev/null
REF_SUM=$(sha256sum /root/ref.snap | cut -d' ' -f1)
mkdir -p /root/bake-out
t0=$(ms); ferry bake --memory $MEM -o "$BAKE_OUT" --run 'echo hi > /hi' >/dev/null 2>&1 || fail "a normal bake failed"; D_bake=$(( $(ms) - t0 ))
bake_ok() { [ "$(tar -xOf "$BAKE_OUT" ./hi 2>/dev/null || tar -xOf "$BAKE_OUT" hi 2>/dev/null)" = hi ]; }
bake_ok || fail "the normal bake's output lacks /hi"
echo "METRIC normal_ms snapshot=$D_snapshot stream=$D_stream fork=$D_fork restore=$D_restore bake=$D_bake"
echo "METRIC ref_bundle_bytes=$(stat -c %s /root/ref.snap)"
gc_out=$(ferry gc --json 2>&1) || true
echo "gc after the normal runs: $gc_out"
reset_host

SUMMARY=()
FAILED=0
KILLS=0
id=0

# kill_once OP TARGET PERCENT: one run of OP, TARGET (ferry or vmm) killed
# at PERCENT of OP's expected duration D_OP. Sets KILLED_AT (empty when the
# operation ended first) and OBSERVED (its duration then).
kill_once() {
    local op=$1 target=$2 pct=$3 pid t0 at vmdir="" var=D_$1
    local dur=${!var}
    case $op in
        snapshot|stream|fork) new_src "$TAG"; read_vmm_pid "$DATA/vms/src" ;;
    esac
    case $op in
        snapshot) ferry snapshot src /root/kp.snap >/tmp/op.out 2>&1 & ;;
        stream) ferry snapshot src - >/root/kp-stream.snap 2>/tmp/op.out & ;;
        fork) ferry fork src --new-name kid --detach >/tmp/op.out 2>&1 & ;;
        restore) ferry restore /root/ref.snap --name rr --detach >/tmp/op.out 2>&1 & ;;
        bake) ferry bake --memory $MEM -o "$BAKE_OUT" --run 'echo hi > /hi' >/tmp/op.out 2>&1 & ;;
    esac
    pid=$!
    now_ms; t0=$NOW
    at=$(( t0 + dur * pct / 100 ))
    KILLED_AT=""
    RC=0
    if [ "$target" = ferry ]; then
        sleep_until "$at"
        if kill -9 "$pid" 2>/dev/null; then now_ms; KILLED_AT=$(( NOW - t0 )); fi
    else
        # The VMM involved: the source's, known before the start, or a
        # restore's or bake's, killed at the first moment it is up after
        # the chosen delay.
        sleep_until "$at"
        while :; do
            case $op in
                restore) read_vmm_pid "$DATA/vms/rr" ;;
                bake) VP=""; for vmdir in "$DATA"/vms/bake-*; do read_vmm_pid "$vmdir"; [ -n "$VP" ] && break; done ;;
            esac
            [ -n "$VP" ] && break
            kill -0 "$pid" 2>/dev/null || break
            read -r -t 0.02 -u "$SLEEPFD" _ || true
        done
        if [ -n "$VP" ] && kill -0 "$pid" 2>/dev/null && kill -9 "$VP" 2>/dev/null; then now_ms; KILLED_AT=$(( NOW - t0 )); fi
    fi
    wait "$pid" 2>/dev/null || RC=$?
    now_ms; OBSERVED=$(( NOW - t0 ))
}

# kill_point OP TARGET PERCENT: kill_once, repeated with the measured
# duration while the operation ends before the kill; then every check.
kill_point() {
    local op=$1 target=$2 pct=$3 attempt var=D_$1
    id=$((id + 1))
    TAG=k$id
    [ "$op" = restore ] && TAG=m1
    echo "-- kill point $id: $op, kill $target at $pct%"
    for attempt in 1 2 3; do
        kill_once "$op" "$target" "$pct"
        [ -n "$KILLED_AT" ] && break
        [ "$RC" = 0 ] || break
        echo "   $op ended in $OBSERVED ms, before the kill (expected ${!var} ms): again with that duration"
        printf -v "$var" %s "$OBSERVED"
        [ "$attempt" = 3 ] || reset_host
    done
    check_point "$op" "$target" "$pct"
}

check_point() {
    local op=$1 target=$2 pct=$3 bad="" notes="" dest="-" srcs="-" extra="" bundle="" why r s k var=D_$1
    if [ -n "$KILLED_AT" ]; then
        KILLS=$((KILLS + 1))
    elif [ "$RC" != 0 ]; then
        bad+=" the operation failed on its own, before the kill: $(grep -m1 'error\[' /tmp/op.out || head -c 300 /tmp/op.out)"
    else
        notes+=" the operation ended before every kill attempt"
    fi
    if [ "$RC" != 0 ] && [ "$RC" != 137 ]; then
        extra+=" err=$(grep -o 'error\[[A-Z_]*\]' /tmp/op.out | head -1 | tr -d '[]' | sed 's/^error//' || true)"
        notes+=" the operation said: $(grep -m1 'error\[' /tmp/op.out || head -c 300 /tmp/op.out)"
    fi
    # A VMM killed under an operation is a VM that stopped, not a broken socket.
    if grep -q 'error\[VM_CONTROL_FAILED\]' /tmp/op.out; then
        bad+=" a killed VMM was reported as VM_CONTROL_FAILED: $(grep -m1 'error\[' /tmp/op.out)"
    fi

    case $op in
        snapshot|stream|fork) settle src ;;
        restore) settle rr ;;
    esac
    [ "$op" = fork ] && settle kid

    # What the operation left at its destination.
    case $op in
        snapshot)
            if [ -e /root/kp.snap ]; then
                r=0; why=$(bundle_check /root/kp.snap "$TAG") || r=$?
                if [ "$r" = 0 ]; then dest=complete; bundle=1; else dest=BAD; bad+=" /root/kp.snap is there but is not a restorable bundle: $why"; fi
            else
                dest=absent
            fi
            for f in /root/.kp.snap.*; do
                [ -e "$f" ] || continue
                notes+=" staging file left beside the destination: $f ($(stat -c %s "$f") bytes)"
                if ferry inspect "$f" >/dev/null 2>&1; then bad+=" ferry inspect accepts the partial file $f"; fi
            done
            ;;
        stream)
            r=0; why=$(bundle_check /root/kp-stream.snap "$TAG") || r=$?
            case $r in
                0) dest=complete; bundle=1 ;;
                1) dest="partial($(stat -c %s /root/kp-stream.snap)B,refused)" ;;
                *) dest=BAD; bad+=" the streamed bundle is accepted by ferry inspect but does not restore: $why" ;;
            esac
            ;;
        bake)
            if [ -e "$BAKE_OUT" ]; then
                if bake_ok; then dest=complete; else dest=BAD; bad+=" $BAKE_OUT exists but is not the complete image"; fi
            else
                dest=absent
            fi
            if ls /root/bake-out/.x.tar.* >/dev/null 2>&1; then notes+=" partial output beside the destination: $(ls /root/bake-out/.x.tar.* | tr '\n' ' ')"; fi
            s=$(ferry ls --json | jq -r '[.[] | select(.name | startswith("bake-")) | "\(.name)=\(.status.state)"] | join(",")')
            [ -z "$s" ] || extra+=" bakevm=$s"
            ;;
        restore)
            [ "$(sha256sum /root/ref.snap | cut -d' ' -f1)" = "$REF_SUM" ] || bad+=" the bundle being restored changed"
            ;;
    esac

    # The source: running and intact, or living on in a complete bundle, or
    # (its VMM killed) stopped with its disk intact.
    case $op in
        snapshot|stream|fork)
            s=$(state src)
            if [ "$s" = running ]; then
                if answers src "$TAG"; then srcs=running-intact; else srcs=running-BROKEN; bad+=" src runs but does not read back its disk and memory"; fi
            elif [ -n "$bundle" ]; then
                srcs="$s,in-bundle"
            elif [ "$target" = vmm ]; then
                if why=$(disk_intact src "$TAG"); then srcs="$s,disk-intact"; else srcs="$s,DISK-LOST"; bad+=" src's disk is not intact: $why"; fi
            else
                srcs="$s,LOST"; bad+=" src is $s and lives in no bundle: the VM is lost"
            fi
            ;;
    esac
    case $op in
        fork)
            k=$(state kid)
            if [ "$k" = running ]; then
                if ! answers kid "$TAG"; then
                    bad+=" kid runs but does not read back the source's disk and memory"; k=running-BROKEN
                elif [ "$(timeout 30 ferry exec kid -- hostname 2>/dev/null)" != kid ]; then
                    bad+=" kid runs without its fork having finished: hostname still $(timeout 30 ferry exec kid -- hostname 2>/dev/null), so its RNG was not reseeded either"
                    k=running-unrefreshed
                fi
            fi
            extra+=" kid=$k"
            ;;
        restore)
            k=$(state rr)
            if [ "$k" = running ]; then
                answers rr m1 || { bad+=" rr runs but does not read back the bundle's disk and memory"; k=running-BROKEN; }
                [ "$RC" = 137 ] && notes+=" rr runs although its restore was killed before it finished"
            fi
            extra+=" rr=$k"
            ;;
    esac

    # gc, then nothing may be left behind.
    local gc=ok gco left broken nleft=none
    if gco=$(ferry gc --json 2>&1) && echo "$gco" | jq -e '.ok == true and (.removed | type == "object")' >/dev/null 2>&1; then
        echo "gc removed: $(echo "$gco" | jq -c '.removed | with_entries(select(.value.count? != 0))') kept: $(echo "$gco" | jq -c '.kept // []')"
    else
        gc=FAIL; bad+=" ferry gc --json: $(echo "$gco" | head -3 | tr '\n' ' ')"
    fi
    local after
    after=$(ferry ls --json | jq -r '[.[] | "\(.name)=\(.status.state)\(if .status.reason then "(" + .status.reason + ")" else "" end)"] | join(",")')
    broken=$(python3 /tmp/layers.py broken "$DATA")
    [ -z "$broken" ] || bad+=" after gc a VM's disk chain is broken: $(echo "$broken" | tr '\n' ';')"
    broken=$(python3 /tmp/layers.py nodisk "$DATA")
    [ -z "$broken" ] || notes+=" VM record(s) left without a root disk (a creation or removal cut short): $(echo "$broken" | tr '\n' ' ')"
    left=$(leftovers)
    if [ -n "$left" ]; then
        echo "$left"
        # What a half-created VM directory means for its name.
        local d n
        for d in $(python3 /tmp/layers.py halfmade "$DATA"); do
            n=$(basename "$d")
            echo "  $n: in ferry ls: $(ferry ls --json | jq --arg n "$n" 'any(.[]; .name == $n)');" \
                "ferry rm -f $n: $(ferry rm -f "$n" 2>&1 | head -1);" \
                "ferry boot --name $n: $(ferry boot --detach --name "$n" --memory $MEM 2>&1 | grep -m1 'error\[' || echo booted)"
        done
        nleft=$(echo "$left" | wc -l)
        bad+=" left after gc: $nleft file(s)"
    fi

    local verdict=PASS line
    if [ -n "$bad" ]; then verdict=FAIL; FAILED=$((FAILED + 1)); fi
    line=$(printf 'KILL %02d %-8s %-5s at %3s%% (%s of %s ms, rc %s): src=%s dest=%s%s gc=%s vms=[%s] leftovers=%s -> %s' \
        "$id" "$op" "$target" "$pct" "${KILLED_AT:-no kill}" "${!var}" "$RC" "$srcs" "$dest" "$extra" "$gc" "$after" "$nleft" "$verdict")
    echo "$line"
    [ -z "$notes" ] || echo "  note:$notes"
    [ -z "$bad" ] || echo "  FAIL:$bad"
    SUMMARY+=("$line")
    reset_host
}

echo "== snapshot to a file"
for p in 10 30 60 90; do kill_point snapshot ferry $p; done
for p in 25 75; do kill_point snapshot vmm $p; done
echo "== snapshot streamed to stdout"
for p in 10 40 70 95; do kill_point stream ferry $p; done
for p in 30 80; do kill_point stream vmm $p; done
echo "== fork"
for p in 5 10 15 30 60 90; do kill_point fork ferry $p; done
for p in 20 50 80; do kill_point fork vmm $p; done
echo "== restore"
for p in 5 10 15 50 85; do kill_point restore ferry $p; done
for p in 40 80; do kill_point restore vmm $p; done
echo "== bake"
kill_point bake ferry 50
kill_point bake vmm 30

echo
echo "Summary: $KILLS kills at $id kill points"
printf '%s\n' "${SUMMARY[@]}"
[ "$KILLS" -ge 20 ] || fail "only $KILLS of $id kill points killed during the operation"
[ "$FAILED" = 0 ] || fail "$FAILED of $id kill points failed"
echo "all kill points passed"
