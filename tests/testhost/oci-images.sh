# OCI images from a real registry: two registries on loopback (Debian's
# docker-registry, one with htpasswd basic auth) serve images built here offline
# as OCI layouts and pushed with skopeo. `ferry pull` by tag and by digest,
# `ferry images`, `ferry rmi`; booting an image runs its Entrypoint+Cmd with its
# Env, WorkingDir and User, which are also the defaults of `ferry exec`; a
# scratch image without /bin/sh still takes exec and cp; layers apply in order
# with whiteouts, opaque directories, owners, modes (setuid), hard links,
# symlinks and xattrs; credentials from ~/.docker/config.json;
# --insecure-registry; JSON error codes for a refused, a missing and an
# unreachable image; nothing half-written left in the cache; a cached image
# boots with its registry gone.
# timeout: 900
set -euo pipefail

ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "FAIL: $*"; exit 1; }
REG=127.0.0.1:5000
AUTH_REG=127.0.0.1:5001
USER_PASS=tester:s3cret-pass
work=/tmp/oci
mkdir -p "$work"

registry_pids=()
cleanup() {
    ferry rm -f st ly >/dev/null 2>&1 || true
    rm -f "$HOME/.docker/config.json"
    for pid in "${registry_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# expect_out WANT CMD...: CMD must succeed and print exactly WANT.
expect_out() {
    local want=$1; shift
    local got rc=0
    got=$("$@" 2>/tmp/expect.err) || rc=$?
    [ "$rc" = 0 ] || fail "$*: exit status $rc: $(cat /tmp/expect.err)"
    [ "$got" = "$want" ] || fail "$*: expected '$want', got '$got'"
    echo "ok: $* -> $(echo "$got" | tr '\n' ' ')"
}
# json_error CODE ARGS...: `ferry --json ARGS` must exit 125 with nothing on
# stdout and one JSON error object with that code on stderr.
json_error() {
    local code=$1; shift
    local rc=0
    ferry --json "$@" >/tmp/err.out 2>/tmp/err.json || rc=$?
    [ "$rc" = 125 ] || fail "ferry --json $*: expected status 125, got $rc: $(cat /tmp/err.json)"
    [ ! -s /tmp/err.out ] || fail "ferry --json $*: stdout is not empty: $(cat /tmp/err.out)"
    jq -e --arg c "$code" '.code == $c and (.message | length > 0) and (.retryable | type == "boolean") and has("hint")' \
        /tmp/err.json >/dev/null || fail "ferry --json $*: expected $code, got: $(cat /tmp/err.json)"
    echo "ok: $* -> $code"
}
# The digest the registry serves for REPO:TAG on REGISTRY.
registry_digest() {
    curl -sfI "${@:3}" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$1/v2/$2" | tr -d '\r' | sed -n 's/^docker-content-digest: //Ip'
}

echo "== registries"
start_registry() { # PORT [auth]
    local dir=$work/registry-$1
    mkdir -p "$dir/data"
    {
        printf 'version: 0.1\nlog:\n  level: warn\n'
        printf 'storage:\n  filesystem:\n    rootdirectory: %s\n' "$dir/data"
        printf 'http:\n  addr: 127.0.0.1:%s\n' "$1"
        if [ "${2:-}" = auth ]; then
            printf 'auth:\n  htpasswd:\n    realm: ferry-test\n    path: /tmp/htpasswd\n'
        fi
    } >"$dir/config.yml"
    docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
    registry_pids+=($!)
    local code=
    for _ in $(seq 1 120); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v2/" || true)
        [ "$code" = 200 ] || [ "$code" = 401 ] && break
        sleep 0.5
    done
    [ "$code" = 200 ] || [ "$code" = 401 ] || { cat "$dir/log"; fail "registry on port $1 did not come up"; }
    echo "registry on 127.0.0.1:$1 answers $code"
}
htpasswd -Bbn "${USER_PASS%%:*}" "${USER_PASS#*:}" >/tmp/htpasswd
start_registry 5000
start_registry 5001 auth
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$AUTH_REG/v2/")" = 401 ] || fail "the auth registry lets anyone in"
[ "$(curl -s -o /dev/null -w '%{http_code}' -u "$USER_PASS" "http://$AUTH_REG/v2/")" = 200 ] || fail "the auth registry refuses its user"

echo "== build OCI image layouts"
# mkoci.py OUT static|auto|layers|musl BUSYBOX [BASE_TAR_ZST]: writes an OCI image layout with one
# image tagged "1" to OUT and prints its manifest digest.
cat >"$work/mkoci.py" <<'PY'
import gzip, hashlib, io, json, os, subprocess, sys, tarfile

out, kind, busybox = sys.argv[1], sys.argv[2], sys.argv[3]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
MTIME = 1700000000
CREATED = "2023-11-14T22:13:20Z"
BUSYBOX = open(busybox, "rb").read()


def put(data):
    """Stores a blob; returns its digest and size."""
    hexd = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, hexd), "wb") as f:
        f.write(data)
    return "sha256:" + hexd, len(data)


class Layer:
    """An uncompressed layer tar built in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, link="", pax=None):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = kind, mode, uid, gid, MTIME, link
        if pax:
            ti.pax_headers = dict(pax)
        if kind == tarfile.REGTYPE:
            ti.size = len(data)
            self.tar.addfile(ti, io.BytesIO(data))
        else:
            self.tar.addfile(ti)

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.add(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid)

    def blob(self):
        """Stores the gzip-compressed layer; returns (descriptor, diff_id)."""
        self.tar.close()
        raw = self.buf.getvalue()
        digest, size = put(gzip.compress(raw, compresslevel=6, mtime=0))
        return layer_descriptor(digest, size), "sha256:" + hashlib.sha256(raw).hexdigest()


def layer_descriptor(digest, size):
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}


def stream_layer(argv):
    """Gzips the tar a command writes, without holding it in memory."""
    tmp = os.path.join(blobs, ".incoming")
    diff = hashlib.sha256()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE)
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        while True:
            chunk = p.stdout.read(1 << 20)
            if not chunk:
                break
            diff.update(chunk)
            gz.write(chunk)
    if p.wait() != 0:
        sys.exit(f"{argv[0]} failed with status {p.returncode}")
    comp = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            comp.update(chunk)
    os.rename(tmp, os.path.join(blobs, comp.hexdigest()))
    return layer_descriptor("sha256:" + comp.hexdigest(), os.path.getsize(os.path.join(blobs, comp.hexdigest()))), \
        "sha256:" + diff.hexdigest()


if kind in ("static", "auto"):
    # Scratch style: a static busybox, passwd/group, a workdir; no /bin/sh.
    # "auto" differs only in its Cmd.
    l = Layer()
    l.dir("bin")
    l.add("bin/busybox", data=BUSYBOX, mode=0o755)
    l.dir("etc")
    l.add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/busybox\napp:x:1234:1234:app:/work:/bin/busybox\n")
    l.add("etc/group", data=b"root:x:0:\napp:x:1234:\n")
    l.dir("work", uid=1234, gid=1234)
    layers = [l.blob()]
    config = {
        "Env": ["GREETING=hi", "PATH=/bin"],
        "Entrypoint": ["/bin/busybox"],
        "Cmd": ["echo", f"hello from {kind}"],
        "WorkingDir": "/work",
        "User": "1234:1234",
    }
elif kind == "musl":
    # musl-based: a program dynamically linked against musl and musl's
    # loader (/opt/ferry/musl, built by the test harness); no shell, no busybox.
    l = Layer()
    l.dir("lib")
    l.add("lib/ld-musl-x86_64.so.1", data=open("/opt/ferry/musl/ld-musl-x86_64.so.1", "rb").read(), mode=0o755)
    l.dir("bin")
    l.add("bin/hello", data=open("/opt/ferry/musl/hello", "rb").read(), mode=0o755)
    l.dir("etc")
    l.add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/hello\napp:x:1234:1234:app:/work:/bin/hello\n")
    l.add("etc/group", data=b"root:x:0:\napp:x:1234:\n")
    l.dir("work", uid=1234, gid=1234)
    layers = [l.blob()]
    config = {
        "Env": ["GREETING=musl", "PATH=/bin"],
        "Entrypoint": ["/bin/hello"],
        "WorkingDir": "/work",
        "User": "app",
    }
elif kind == "layers":
    # 1: ferry's base rootfs tarball, as it is.
    layers = [stream_layer(["zstd", "-dc", sys.argv[4]])]
    # 2: files, owners, modes, links and an xattr.
    l = Layer()
    l.dir("data")
    l.add("data/keep", data=b"keep\n")
    l.add("data/gone", data=b"gone\n")
    l.dir("data/dir")
    l.add("data/dir/a", data=b"a\n")
    l.dir("opq")
    l.add("opq/old1", data=b"old1\n")
    l.add("opq/old2", data=b"old2\n")
    l.add("usr/local/bin/suid", data=BUSYBOX, mode=0o4755)
    l.add("home/owned", data=b"owned\n", mode=0o640, uid=1500, gid=1600)
    l.add("data/hard", tarfile.LNKTYPE, link="data/keep")
    l.add("data/link", tarfile.SYMTYPE, link="keep", mode=0o777)
    l.add("data/xattr", data=b"xattr\n", pax={"SCHILY.xattr.user.ferry": "yes"})
    layers.append(l.blob())
    # 3: a whiteout and an opaque directory.
    l = Layer()
    l.dir("data")
    l.add("data/.wh.gone")
    l.dir("opq")
    l.add("opq/.wh..wh..opq")
    l.add("opq/new", data=b"new\n")
    layers.append(l.blob())
    config = {
        "Env": ["MODE=layers", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh", "-c", "echo layered"],
        "WorkingDir": "/data",
        "User": "nobody",
    }
elif kind in ("multi", "armonly"):
    # Multi-platform: an index whose entries share the static layer. "multi"
    # has linux/arm64 first and linux/amd64 second; "armonly" only arm64.
    l = Layer()
    l.dir("bin")
    l.add("bin/busybox", data=BUSYBOX, mode=0o755)
    desc, diff = l.blob()
    entries = []
    arches = ["arm64", "amd64"] if kind == "multi" else ["arm64"]
    for arch in arches:
        cfg = {"architecture": arch, "os": "linux",
               "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["echo", f"hello from {arch}"]},
               "rootfs": {"type": "layers", "diff_ids": [diff]}}
        cd, cs = put(json.dumps(cfg).encode())
        m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
             "layers": [desc]}
        md, ms = put(json.dumps(m).encode())
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                        "platform": {"architecture": arch, "os": "linux"}})
    nested = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    nd, ns = put(json.dumps(nested).encode())
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": nd, "size": ns,
                                  "annotations": {"org.opencontainers.image.ref.name": "1"}}]}, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(nd)
    sys.exit(0)
else:
    sys.exit(f"unknown image kind {kind}")

image_config = {
    "created": CREATED,
    "architecture": "amd64",
    "os": "linux",
    "config": config,
    "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
    "history": [{"created": CREATED, "created_by": f"oci-images.sh {kind} layer {i + 1}"} for i in range(len(layers))],
}
cfg_digest, cfg_size = put(json.dumps(image_config).encode())
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
    "layers": [desc for desc, _ in layers],
}
man_digest, man_size = put(json.dumps(manifest).encode())
index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": man_digest,
        "size": man_size,
        "annotations": {"org.opencontainers.image.ref.name": "1"},
    }],
}
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
print(man_digest)
PY
shopt -s nullglob
bases=("$HOME"/.cache/ferry/rootfs/*/rootfs.tar.zst)
shopt -u nullglob
[ "${#bases[@]}" -gt 0 ] || fail "no base rootfs tarball under ~/.cache/ferry/rootfs"
base=${bases[0]}
t0=$(ms)
python3 "$work/mkoci.py" "$work/static" static /bin/busybox >/dev/null
python3 "$work/mkoci.py" "$work/auto" auto /bin/busybox >/dev/null
python3 "$work/mkoci.py" "$work/layers" layers /bin/busybox "$base" >/dev/null
python3 "$work/mkoci.py" "$work/multi" multi /bin/busybox >/dev/null
python3 "$work/mkoci.py" "$work/musl" musl /bin/busybox >/dev/null
python3 "$work/mkoci.py" "$work/armonly" armonly /bin/busybox >/dev/null
echo "METRIC oci_build_layouts_ms=$(( $(ms) - t0 )) layers_bytes=$(du -sb "$work/layers" | cut -f1)"

echo "== push with skopeo"
push() { # LAYOUT DEST [skopeo copy flags...]
    skopeo --insecure-policy copy --quiet --dest-tls-verify=false "${@:3}" "oci:$1:1" "docker://$2"
}
push "$work/static" "$REG/static:1"
push "$work/auto" "$REG/static:auto"
push "$work/layers" "$REG/layers:1"
push "$work/musl" "$REG/musl:1"
push "$work/static" "$AUTH_REG/private/static:1" --dest-creds "$USER_PASS"
push "$work/multi" "$REG/multi:1" --all
push "$work/armonly" "$REG/armonly:1" --all
rm -rf "$work/static" "$work/auto" "$work/layers" "$work/multi" "$work/armonly" "$work/musl" # the registries hold them now; /tmp is memory
static_digest=$(registry_digest "$REG" static/manifests/1)
layers_digest=$(registry_digest "$REG" layers/manifests/1)
auto_digest=$(registry_digest "$REG" static/manifests/auto)
private_digest=$(registry_digest "$AUTH_REG" private/static/manifests/1 -u "$USER_PASS")
echo "static $static_digest, layers $layers_digest, private $private_digest"
[[ $static_digest == sha256:* && $layers_digest == sha256:* && $auto_digest == sha256:* ]] || fail "the registry does not serve the pushed images"
[ "$private_digest" = "$static_digest" ] || fail "the same image has two digests: $private_digest $static_digest"

echo "== pull by tag and by digest, images"
t0=$(ms)
ferry pull --json "$REG/static:1" >/tmp/pull.json || fail "pull $REG/static:1"
echo "METRIC oci_pull_static_ms=$(( $(ms) - t0 ))"
cat /tmp/pull.json
jq -e --arg d "$static_digest" --arg r "$REG/static:1" \
    '.digest == $d and .reference == $r and .id == .digest[7:19] and .layers == 1 and .size > 0' \
    /tmp/pull.json >/dev/null || fail "pull output"
static_id=$(jq -r .id /tmp/pull.json)
ferry pull --json "$REG/static@$static_digest" >/tmp/pull2.json || fail "pull by digest"
jq -e --arg d "$static_digest" '.digest == $d' /tmp/pull2.json >/dev/null || fail "pull by digest: $(cat /tmp/pull2.json)"
ferry images --json >/tmp/images.json
cat /tmp/images.json
jq -e --arg d "$static_digest" 'any(.[]; .digest == $d and (.reference | contains("static")) and .id == .digest[7:19] and .size > 0 and has("created"))' \
    /tmp/images.json >/dev/null || fail "images --json does not list $REG/static:1"
ferry images | tee /tmp/images.txt
grep -q "$static_id" /tmp/images.txt || fail "images does not show the id $static_id"

echo "== boot the scratch image"
t0=$(ms)
expect_out "hello from static" ferry boot "$REG/static:1"
echo "METRIC oci_boot_static_first_ms=$(( $(ms) - t0 ))"
t0=$(ms)
expect_out "hello from static" ferry boot "$REG/static:1"
echo "METRIC oci_boot_static_ms=$(( $(ms) - t0 ))"
expect_out 1234 ferry boot "$REG/static:1" -- /bin/busybox id -u
expect_out 1234 ferry boot "$REG/static:1" -- /bin/busybox id -g
expect_out /work ferry boot "$REG/static:1" -- /bin/busybox pwd
# shellcheck disable=SC2016 # expanded by the guest's shell
expect_out hi ferry boot "$REG/static:1" -- /bin/busybox sh -c 'echo $GREETING'
# A tag never pulled (another image of the same repository) is pulled by the boot.
expect_out "hello from auto" ferry boot "$REG/static:auto"
ferry images --json | jq -e --arg d "$auto_digest" 'any(.[]; .digest == $d)' >/dev/null \
    || fail "boot did not pull $REG/static:auto ($auto_digest)"
[ "$(ferry ls --json | jq length)" = 0 ] || { ferry ls; fail "attached boots left VMs"; }

echo "== exec and cp without a shell in the image"
ferry boot --detach --name st "$REG/static:1" -- /bin/busybox sleep 600 >/dev/null
ferry exec st /bin/busybox ls / >/tmp/ls.out || fail "exec ls in a shell-less VM"
for d in bin etc work; do grep -qx "$d" /tmp/ls.out || fail "/$d missing in the static VM: $(tr '\n' ' ' </tmp/ls.out)"; done
ferry exec st /bin/busybox test ! -e /bin/sh || fail "/bin/sh exists in the static VM"
expect_out 1234 ferry exec st /bin/busybox id -u
expect_out /work ferry exec st /bin/busybox pwd
# shellcheck disable=SC2016
expect_out hi ferry exec st /bin/busybox sh -c 'echo $GREETING'
ferry cp /etc/hostname st:/work/copied || fail "cp into the static VM"
expect_out "$(cat /etc/hostname)" ferry exec st /bin/busybox cat /work/copied
ferry cp st:/work/copied /tmp/back || fail "cp out of the static VM"
cmp /etc/hostname /tmp/back || fail "cp round trip changed the file"
# Directory trees go through the agent's own tar tools, not the image's.
mkdir -p /tmp/tree/sub
echo one >/tmp/tree/a
echo two >/tmp/tree/sub/b
chmod 750 /tmp/tree/sub
ln -s a /tmp/tree/link
ferry cp /tmp/tree st:/work/tree || fail "cp of a directory into the static VM"
expect_out two ferry exec -u root st /bin/busybox cat /work/tree/sub/b
expect_out a ferry exec st /bin/busybox readlink /work/tree/link
expect_out 750 ferry exec st /bin/busybox stat -c %a /work/tree/sub
ferry cp st:/work/tree /tmp/tree-back || fail "cp of a directory out of the static VM"
diff -r /tmp/tree /tmp/tree-back || fail "the directory changed on its round trip"
ferry rm -f st >/dev/null

echo "== a musl-based image"
expect_out "hello from musl: user=app cwd=/work greeting=musl" ferry boot "$REG/musl:1"
rc=0
ferry boot "$REG/musl:1" -- /bin/hello 7 >/dev/null 2>&1 || rc=$?
[ "$rc" = 7 ] || fail "the musl program's exit status came back as $rc, not 7"
ferry boot --detach --name mu "$REG/musl:1" -- /bin/hello wait >/dev/null 2>&1
expect_out "hello from musl: user=app cwd=/work greeting=musl" ferry exec mu /bin/hello
expect_out "hello from musl: user=root cwd=/ greeting=musl" ferry exec -u root -w / mu /bin/hello
ferry cp /tmp/tree mu:/work/tree || fail "cp of a directory into the musl VM"
ferry cp mu:/work/tree /tmp/tree-musl || fail "cp of a directory out of the musl VM"
diff -r /tmp/tree /tmp/tree-musl || fail "the directory changed on its way through the musl VM"
ferry rm -f mu >/dev/null

echo "== bake from a shell-less registry image"
mkdir -p /tmp/site
echo baked >/tmp/site/index.html
ferry bake --from "$REG/static:1" --copy /tmp/site:/srv/site --env BAKED=yes -o /tmp/static-baked.tar.zst \
    || fail "bake --from $REG/static:1"
# The image's Entrypoint/Cmd, User, WorkingDir and Env come along, with the bake's additions.
expect_out "hello from static" ferry boot /tmp/static-baked.tar.zst
expect_out baked ferry boot /tmp/static-baked.tar.zst -- /bin/busybox cat /srv/site/index.html
tar --zstd -xOf /tmp/static-baked.tar.zst ./etc/ferry/image.json >/tmp/baked-image.json \
    || fail "no image config in the baked tarball"
jq -e '.user == "1234:1234" and .workdir == "/work" and .env.BAKED == "yes"' /tmp/baked-image.json >/dev/null \
    || fail "the baked image config: $(cat /tmp/baked-image.json)"
tar --zstd -tvf /tmp/static-baked.tar.zst | grep -E ' \./(bin/busybox|work/)$' || true
expect_out 1234 ferry boot /tmp/static-baked.tar.zst -- /bin/busybox id -u
expect_out /work ferry boot /tmp/static-baked.tar.zst -- /bin/busybox pwd
# shellcheck disable=SC2016
expect_out "hi yes" ferry boot /tmp/static-baked.tar.zst -- /bin/busybox sh -c 'echo $GREETING $BAKED'
expect_out 1234:1234 ferry boot /tmp/static-baked.tar.zst -- /bin/busybox stat -c %u:%g /work
ferry boot /tmp/static-baked.tar.zst -- /bin/busybox test ! -e /bin/sh || fail "the baked image grew a /bin/sh"

echo "== layers: whiteouts, opaque directories, owners, modes, links, xattrs"
t0=$(ms)
ferry pull --json "$REG/layers:1" >/tmp/pull-layers.json || fail "pull $REG/layers:1"
echo "METRIC oci_pull_layers_ms=$(( $(ms) - t0 )) bytes=$(jq .size /tmp/pull-layers.json)"
jq -e --arg d "$layers_digest" '.digest == $d and .layers == 3' /tmp/pull-layers.json >/dev/null \
    || fail "pull output: $(cat /tmp/pull-layers.json)"
expect_out layered ferry boot "$REG/layers:1"
t0=$(ms)
ferry boot --detach --name ly "$REG/layers:1" -- sleep 600 >/dev/null
echo "METRIC oci_boot_layers_detached_ms=$(( $(ms) - t0 ))"
expect_out keep ferry exec ly cat /data/keep
expect_out "$(printf 'dir\nhard\nkeep\nlink\nxattr')" ferry exec ly ls -A /data
expect_out a ferry exec ly cat /data/dir/a
expect_out new ferry exec ly ls -A /opq
ferry exec ly test ! -e /data/gone || fail "/data/gone survived its whiteout"
ferry exec ly test ! -e /opq/old1 -a ! -e /opq/old2 || fail "the opaque directory kept lower files"
expect_out 1500:1600:640 ferry exec ly stat -c %u:%g:%a /home/owned
expect_out 0:0:4755 ferry exec ly stat -c %u:%g:%a /usr/local/bin/suid
# A tree copied out of a guest brings no setuid bit to the host.
ferry cp ly:/usr/local/bin /tmp/suid-out || fail "cp of /usr/local/bin out of the layered VM"
[ "$(stat -c %a /tmp/suid-out/suid)" = 755 ] || fail "cp out kept a guest's setuid bit: $(stat -c %a /tmp/suid-out/suid)"
keep=$(ferry exec ly stat -c %i:%h /data/keep)
[ "${keep#*:}" = 2 ] || fail "/data/keep link count: $keep"
expect_out "$keep" ferry exec ly stat -c %i:%h /data/hard
expect_out keep ferry exec ly readlink /data/link
expect_out keep ferry exec ly cat /data/link
debian=$(ferry exec ly cat /etc/debian_version) || fail "the base layer is missing"
[[ $debian == 12* ]] || fail "the base layer is not bookworm: $debian"
if ferry exec ly sh -c 'command -v perl' >/dev/null; then
    # getxattr(2) (syscall 191 on x86_64) from perl-base, which has no xattr module.
    # shellcheck disable=SC2016
    expect_out yes ferry exec ly perl -e 'my ($p, $k, $v) = ($ARGV[0], "user.ferry", "\0" x 64);
        my $n = syscall(191, $p, $k, $v, 64); die "getxattr: $!\n" if $n < 0; print substr($v, 0, $n), "\n"' /data/xattr
else
    echo "SKIP: nothing in the image reads xattrs"
fi
expect_out nobody ferry exec ly id -un
expect_out root ferry exec -u root ly id -un
expect_out /data ferry exec ly pwd
# shellcheck disable=SC2016
expect_out layers ferry exec ly sh -c 'echo $MODE'
ferry rm -f ly >/dev/null

echo "== credentials"
json_error IMAGE_PULL_UNAUTHORIZED pull "$AUTH_REG/private/static:1"
mkdir -p "$HOME/.docker"
printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$AUTH_REG" "$(printf '%s' "${USER_PASS%%:*}:wrong" | base64 -w0)" \
    >"$HOME/.docker/config.json"
json_error IMAGE_PULL_UNAUTHORIZED pull "$AUTH_REG/private/static:1"
printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$AUTH_REG" "$(printf '%s' "$USER_PASS" | base64 -w0)" \
    >"$HOME/.docker/config.json"
ferry pull --json "$AUTH_REG/private/static:1" >/tmp/pull-private.json || fail "pull with credentials"
jq -e --arg d "$static_digest" '.digest == $d' /tmp/pull-private.json >/dev/null \
    || fail "pull with credentials: $(cat /tmp/pull-private.json)"
rm -f "$HOME/.docker/config.json"

echo "== --insecure-registry"
# Another name for the plain-HTTP registry: only loopback names are plain HTTP
# without being told.
grep -q ' registry\.test$' /etc/hosts || echo "127.0.0.1 registry.test" >>/etc/hosts
json_error REGISTRY_UNREACHABLE pull registry.test:5000/static:1
ferry pull --json --insecure-registry registry.test:5000 registry.test:5000/static:1 >/tmp/pull-insecure.json \
    || fail "pull with --insecure-registry"
jq -e --arg d "$static_digest" '.digest == $d' /tmp/pull-insecure.json >/dev/null \
    || fail "pull with --insecure-registry: $(cat /tmp/pull-insecure.json)"

echo "== multi-platform indexes"
expect_out "hello from amd64" ferry boot "$REG/multi:1"
json_error IMAGE_PLATFORM_MISSING pull "$REG/armonly:1"
jq -e '.message | contains("linux/arm64")' /tmp/err.json >/dev/null \
    || fail "the platform error does not name the platforms the image has: $(cat /tmp/err.json)"

echo "== missing and unreachable images"
json_error IMAGE_NOT_FOUND pull "$REG/static:missing"
json_error IMAGE_NOT_FOUND pull "$REG/nosuch:1"
json_error REGISTRY_UNREACHABLE pull 127.0.0.1:5999/x:1

echo "== rmi"
ferry rmi "$REG/layers:1" || fail "rmi $REG/layers:1"
ferry images --json >/tmp/images.json
jq -e --arg d "$layers_digest" 'all(.[]; .digest != $d and (.reference | contains("/layers") | not))' \
    /tmp/images.json >/dev/null || fail "rmi left $REG/layers:1: $(cat /tmp/images.json)"
jq -e --arg d "$static_digest" 'any(.[]; .digest == $d)' /tmp/images.json >/dev/null \
    || fail "rmi of layers removed static too"
left=$(find "$HOME/.cache/ferry/oci" \( -name '*.staging*' -o -name '*.partial*' -o -name '.*.tmp-*' \) 2>/dev/null || true)
[ -z "$left" ] || fail "half-written files left in the image cache: $left"

echo "== cached images boot without their registry"
kill "${registry_pids[0]}"
wait "${registry_pids[0]}" 2>/dev/null || true
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$REG/v2/" || true)" = 000 ] || fail "the registry is still up"
expect_out "hello from static" ferry boot "$REG/static:1"
json_error REGISTRY_UNREACHABLE boot "$REG/layers:1"
[ "$(ferry ls --json | jq length)" = 0 ] || { ferry ls; fail "boots left VMs"; }

echo "oci-images: all checks passed"
