# containerd runs containers as ferry VMs through containerd-shim-ferry-v2
# (`--runtime io.containerd.ferry.v2`), with Debian's containerd. The image is
# a busybox OCI archive built here offline from Debian's busybox-static and
# imported with `ctr image import`. `ctr run` prints from inside the VM and
# exits with the command's status; `ctr task exec` reaches a running one,
# with stdin and on a tty; pause/resume freeze the VM; kill sends a signal;
# delete leaves no VM behind; a process the guest's OOM killer ends is an
# /tasks/oom event; a checkpoint is a ferry bundle in containerd's
# content store; a missing command and an empty image are errors ctr shows.
# Docker (Debian's docker.io 20.10) runs the same VMs through ferry-runc:
# `docker run --rm --runtime io.containerd.ferry.v2`, `docker exec`, `docker rm`.
# timeout: 600
set -euo pipefail

ms() { echo $(( $(date +%s%N) / 1000000 )); }
# What a failure needs to be understood: the shims' and VMs' state and logs.
diag() {
    echo "--- processes"
    ps -eo pid,ppid,stat,etime,wchan:24,args | grep -E "ctr|shim|ferry|mke2fs|containerd|runc|docker|script" | grep -v grep || true
    for pid in $(pgrep -f containerd-shim-ferry-v2 || true); do
        echo "--- threads of $pid"
        for t in /proc/"$pid"/task/*; do echo "$(cat "$t/comm") $(cat "$t/wchan")"; done
    done
    echo "--- ferry ls"; ferry ls || true
    for d in /root/.local/share/ferry/vms/*/; do
        [ -d "$d" ] || continue
        echo "--- $d"; ls "$d"
        tail -n 15 "$d"/console.log "$d"/vmm.log 2>/dev/null || true
    done
    echo "--- containerd log (not info)"; grep -v 'level=info' /tmp/containerd.log | tail -n 30 || true
    echo "--- shim log"; grep -iE 'ferry|shim' /tmp/containerd.log | tail -n 30 || true
}
fail() {
    echo "FAIL: $*"
    diag
    exit 1
}
RT=io.containerd.ferry.v2
IMG=ferry.test/busybox:1
work=/tmp/ctr-test
mkdir -p "$work"

cleanup() {
    for id in t-run t-oom t-main t-tty t-cp t-bad t-empty; do
        ctr task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
        ctr task delete "$id" >/dev/null 2>&1 || true
        ctr container delete "$id" >/dev/null 2>&1 || true
    done
    [ -z "${dockerd_pid:-}" ] || kill "$dockerd_pid" 2>/dev/null || true
    [ -z "${containerd_pid:-}" ] || kill "$containerd_pid" 2>/dev/null || true
}
trap cleanup EXIT

echo "== busybox OCI archive from Debian's busybox-static"
# oci_archive ROOTFS NAME OUT: an OCI image layout of one uncompressed layer
# (the tree at ROOTFS), tagged NAME, as a tar archive.
oci_archive() {
    python3 - "$@" <<'EOF'
import hashlib, io, json, os, sys, tarfile
rootfs, name, out = sys.argv[1:4]
blobs = {}
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    blobs[d] = data
    return "sha256:" + d
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
    for entry in sorted(os.listdir(rootfs)):
        t.add(os.path.join(rootfs, entry), arcname=entry)
layer = layer.getvalue()
layer_digest = blob(layer)
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
    "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
}).encode()
config_digest = blob(config)
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}],
}).encode()
manifest_digest = blob(manifest)
index = json.dumps({
    "schemaVersion": 2,
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": len(manifest),
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
    }],
}).encode()
# Docker 20.10 loads only its own archive format: manifest.json beside the
# OCI layout makes the same file loadable by both.
docker_manifest = json.dumps([{
    "Config": "blobs/sha256/" + config_digest[7:],
    "RepoTags": [name],
    "Layers": ["blobs/sha256/" + layer_digest[7:]],
}]).encode()
with tarfile.open(out, "w") as t:
    def add(path, data):
        info = tarfile.TarInfo(path)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    add("manifest.json", docker_manifest)
    for d, data in blobs.items():
        add("blobs/sha256/" + d, data)
EOF
}
root=$work/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/proc" "$root/sys" "$root/dev"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
oci_archive "$root" "$IMG" "$work/busybox.tar"
empty=$work/empty-rootfs
mkdir -p "$empty"
oci_archive "$empty" ferry.test/empty:1 "$work/empty.tar"
ls -l "$work"/*.tar

echo "== containerd"
modprobe overlay
containerd --log-level debug >/tmp/containerd.log 2>&1 &
containerd_pid=$!
for _ in $(seq 100); do
    ctr version >/dev/null 2>&1 && break
    sleep 0.2
done
ctr version | sed -n 's/^ *Version: */containerd /p' | head -n 2
ctr image import "$work/busybox.tar" || fail "import the busybox archive"
ctr image import "$work/empty.tar" || fail "import the empty archive"
ctr image ls -q | grep -x "$IMG" >/dev/null || fail "no $IMG after the import: $(ctr image ls -q)"

echo "== ctr run: output from inside the VM, the command's exit status"
host_kernel=$(uname -r)
t=$(ms)
rc=0
out=$(timeout 180 ctr run --rm --runtime "$RT" "$IMG" t-run sh -c 'echo "hello from $(uname -r)"; echo to-stderr >&2; exit 3' 2>&1) || rc=$?
echo "ctr run took $(( $(ms) - t )) ms"
echo "$out"
[ "$rc" = 3 ] || fail "ctr run: expected exit status 3, got $rc"
grep -q "^hello from " <<<"$out" || fail "ctr run: no output"
grep -q "^hello from $host_kernel\$" <<<"$out" && fail "ctr run ran on the host's kernel, not in a VM"
grep -q "^to-stderr\$" <<<"$out" || fail "ctr run: no stderr"
ctr container ls -q | grep -x t-run >/dev/null && fail "ctr run --rm left the container"
[ -z "$(ferry ls -q 2>/dev/null)" ] || fail "a VM is left after ctr run --rm: $(ferry ls)"
echo "ok: ctr run"

echo "== OOM: a process the guest's OOM killer ends is an /tasks/oom event"
# A memory cgroup of 16 MiB in the guest, so its kernel's OOM killer acts at
# once: the whole guest running short would thrash for minutes under
# emulation before it did.
ctr events >/tmp/ctr-events.log 2>&1 &
events_pid=$!
sleep 0.5
rc=0
timeout 180 ctr run --rm --runtime "$RT" "$IMG" t-oom sh -c '
    echo +memory >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
    mkdir /sys/fs/cgroup/hog && echo 16M >/sys/fs/cgroup/hog/memory.max &&
    echo $$ >/sys/fs/cgroup/hog/cgroup.procs &&
    exec dd if=/dev/zero of=/dev/null bs=64M count=1' || rc=$?
sleep 0.5
kill "$events_pid" 2>/dev/null || true
grep -E '/tasks/(oom|exit)' /tmp/ctr-events.log || true
[ "$rc" = 137 ] || fail "OOM: expected exit status 137 (SIGKILL), got $rc"
grep -q '/tasks/oom' /tmp/ctr-events.log || fail "no /tasks/oom event: $(cat /tmp/ctr-events.log)"
echo "ok: the OOM kill is an /tasks/oom event and exit status 137"

echo "== a running container: exec, stdin, tty, pause/resume, kill"
ctr run -d --runtime "$RT" "$IMG" t-main sh -c 'echo started >/tmp/started; exec sleep 1000' || fail "ctr run -d"
ctr task ls | grep -E "^t-main +[0-9]+ +RUNNING" || fail "t-main is not running: $(ctr task ls)"
vmm=$(ctr task ls | awk '$1 == "t-main" {print $2}')
grep -q ferry-vmm "/proc/$vmm/cmdline" || fail "the task's pid $vmm is not its ferry-vmm"
[ "$(ferry ls -q)" = "ctr-default-t-main" ] || fail "expected the VM ctr-default-t-main: $(ferry ls)"

t=$(ms)
rc=0
out=$(ctr task exec --exec-id e1 t-main sh -c 'cat /tmp/started; uname -r; exit 4') || rc=$?
echo "ctr task exec took $(( $(ms) - t )) ms"
[ "$rc" = 4 ] || fail "ctr task exec: expected exit status 4, got $rc"
[ "$(head -n 1 <<<"$out")" = started ] || fail "ctr task exec: got '$out'"
[ "$(tail -n 1 <<<"$out")" != "$host_kernel" ] || fail "ctr task exec ran on the host's kernel"
echo "ok: exec sees the container's files and runs in its VM"

out=$(printf 'line one\nline two\n' | ctr task exec --exec-id e2 t-main sh -c 'wc -l; read -r x || true')
[ "$(echo "$out" | tr -d ' ')" = 2 ] || fail "stdin: expected 2 lines, got '$out'"
echo "ok: stdin reaches the process and its end is seen"

out=$(script -qec "ctr task exec -t --exec-id e3 t-main sh -c 'tty; stty size'" /dev/null | tr -d '\r')
grep -q '/dev/pts/' <<<"$out" || fail "tty: the process has no terminal: '$out'"
echo "ok: -t runs on a terminal ($(echo "$out" | tr '\n' ' '))"
out=$(script -qec "ctr run -t --rm --runtime $RT $IMG t-tty tty" /dev/null | tr -d '\r')
grep -q '/dev/pts/' <<<"$out" || fail "ctr run -t: the process has no terminal: '$out'"
echo "ok: ctr run -t runs the container on a terminal"

ctr task pause t-main
ctr task ls | grep -E "^t-main .*PAUSED" || fail "not PAUSED after pause: $(ctr task ls)"
paused=$(ferry ps --json | jq -r '.[] | select(.name == "ctr-default-t-main") | .paused')
[ "$paused" = true ] || fail "ferry does not see the VM paused: $(ferry ps)"
ctr task resume t-main
ctr task ls | grep -E "^t-main .*RUNNING" || fail "not RUNNING after resume: $(ctr task ls)"
out=$(ctr task exec --exec-id e4 t-main echo alive) || fail "exec after resume"
[ "$out" = alive ] || fail "exec after resume: '$out'"
echo "ok: pause/resume"

ctr task metrics t-main || echo "(metrics not shown)"
ctr task ps t-main

ctr task kill -s SIGTERM t-main
for _ in $(seq 100); do
    ctr task ls | grep -E "^t-main .*STOPPED" >/dev/null && break
    sleep 0.1
done
ctr task ls | grep -E "^t-main .*STOPPED" || fail "not STOPPED after SIGTERM: $(ctr task ls)"
# ctr task delete reports the exit status it collects as a warning.
out=$(ctr task delete t-main 2>&1) || fail "ctr task delete: $out"
echo "$out"
grep -q "exit code 143" <<<"$out" || fail "kill -s SIGTERM: expected exit status 143: $out"
ctr container delete t-main
[ -z "$(ferry ls -q)" ] || fail "a VM is left after delete: $(ferry ls)"
pgrep -x ferry-vmm && fail "a ferry-vmm process is left after delete"
[ -z "$(ls /root/.local/share/ferry/containers/)" ] || fail "an image is left after delete: $(ls /root/.local/share/ferry/containers/)"
echo "ok: kill with a signal; delete leaves no VM behind"

echo "== checkpoint: a ferry bundle in containerd's content store"
ctr run -d --runtime "$RT" "$IMG" t-cp sh -c 'i=0; while true; do i=$((i+1)); echo $i >/tmp/count; sleep 0.2; done'
t=$(ms)
cp_image=$(ctr task checkpoint t-cp) || fail "ctr task checkpoint"
echo "checkpoint $cp_image took $(( $(ms) - t )) ms"
ctr task ls | grep -E "^t-cp .*RUNNING" || fail "not RUNNING after the checkpoint: $(ctr task ls)"
index=$(ctr image ls | awk -v n="$cp_image" '$1 == n {print $3}')
[ -n "$index" ] || fail "no checkpoint image $cp_image: $(ctr image ls)"
digest=$(ctr content get "$index" |
    jq -r '.manifests[] | select(.mediaType | test("checkpoint.criu.tar")) | .digest')
[ -n "$digest" ] || fail "the checkpoint image has no checkpoint layer: $(ctr content get "$index")"
ctr content get "$digest" | tar -xO --wildcards '*ferry.snap' >"$work/cp.snap" ||
    fail "the checkpoint has no ferry.snap: $(ctr content get "$digest" | tar -t)"
ls -l "$work/cp.snap"
ferry inspect "$work/cp.snap" >"$work/inspect.txt" || fail "the checkpoint is not a ferry bundle"
head -n 5 "$work/inspect.txt"
ctr task kill -s SIGKILL t-cp
sleep 1
ctr task delete t-cp || true
ctr container delete t-cp
echo "ok: checkpoint"

echo "== errors containerd shows"
rc=0
out=$(ctr run --rm --runtime "$RT" "$IMG" t-bad /no/such/command 2>&1) || rc=$?
echo "$out"
[ "$rc" != 0 ] || fail "a missing command ran"
grep -q "SHIM_EXECUTABLE_NOT_FOUND" <<<"$out" || fail "a missing command: no SHIM_EXECUTABLE_NOT_FOUND"
ctr container delete t-bad >/dev/null 2>&1 || true
rc=0
out=$(ctr run --rm --runtime "$RT" ferry.test/empty:1 t-empty /bin/sh 2>&1) || rc=$?
echo "$out"
[ "$rc" != 0 ] || fail "an empty image ran"
grep -q "IMAGE_NOT_ROOTFS" <<<"$out" || fail "an empty image: no IMAGE_NOT_ROOTFS"
ctr container delete t-empty >/dev/null 2>&1 || true
[ -z "$(ferry ls -q)" ] || fail "a VM is left after the failed runs: $(ferry ls)"
echo "ok: errors"

echo "== docker (Debian's docker.io 20.10): ferry-runc behind the runtime's name"
# Docker 20.10 runs every runtime through containerd-shim-runc-v2, so the
# runtime is ferry-runc, the shim's runc-compatible front end, registered
# under the shim's name (Docker 23 and later take the shim itself).
ln -sf /opt/ferry/bin/containerd-shim-ferry-v2 /usr/local/bin/ferry-runc
mkdir -p /etc/docker
echo '{"runtimes": {"io.containerd.ferry.v2": {"path": "/usr/local/bin/ferry-runc"}}}' >/etc/docker/daemon.json
dockerd --containerd /run/containerd/containerd.sock --iptables=false --bridge=none \
    >/tmp/dockerd.log 2>&1 &
dockerd_pid=$!
for _ in $(seq 150); do
    docker version >/dev/null 2>&1 && break
    sleep 0.2
done
docker version --format 'docker {{.Server.Version}}' || fail "dockerd did not start: $(tail -n 20 /tmp/dockerd.log)"
docker load -i "$work/busybox.tar" || fail "docker load"
t=$(ms)
rc=0
out=$(docker run --rm --network none --runtime "$RT" "$IMG" sh -c 'echo "docker in $(uname -r)"; exit 5' 2>&1) || rc=$?
echo "docker run took $(( $(ms) - t )) ms"
echo "$out"
[ "$rc" = 5 ] || fail "docker run: expected exit status 5, got $rc: $(tail -n 20 /tmp/dockerd.log)"
grep -q "^docker in " <<<"$out" || fail "docker run: no output"
grep -q "^docker in $host_kernel\$" <<<"$out" && fail "docker run ran on the host's kernel"
echo "ok: docker run"
cid=$(docker run -d --network none --runtime "$RT" "$IMG" sh -c 'echo up >/tmp/up; exec sleep 1000')
out=$(docker exec "$cid" cat /tmp/up) || fail "docker exec: $(tail -n 20 /tmp/dockerd.log)"
[ "$out" = up ] || fail "docker exec: got '$out'"
rc=0
docker exec "$cid" sh -c 'exit 6' || rc=$?
[ "$rc" = 6 ] || fail "docker exec: expected exit status 6, got $rc"
echo "ok: docker exec"
out=$(timeout 60 script -qec "docker exec -t $cid tty" /dev/null | tr -d '\r') || true
grep -q '/dev/pts/' <<<"$out" || fail "docker exec -t: no terminal: '$out'; dockerd: $(tail -n 15 /tmp/dockerd.log)"
out=$(timeout 60 script -qec "docker run -t --rm --network none --runtime $RT $IMG tty" /dev/null | tr -d '\r') || true
grep -q '/dev/pts/' <<<"$out" || fail "docker run -t: no terminal: '$out'; dockerd: $(tail -n 15 /tmp/dockerd.log)"
echo "ok: docker run -t and docker exec -t run on a terminal"
docker rm -f "$cid" >/dev/null
for _ in $(seq 50); do
    [ -z "$(ferry ls -q)" ] && break
    sleep 0.1
done
[ -z "$(ferry ls -q)" ] || fail "a VM is left after docker rm -f: $(ferry ls)"
[ -z "$(ls /root/.local/share/ferry/containers/)" ] || fail "an image is left after docker rm -f"
echo "ok: docker rm leaves no VM"
kill "$dockerd_pid" 2>/dev/null || true
echo "PASS"
