# The ferry Python package under pytest, in one test host: exec and spawn
# (stdin, env/cwd/user, exit codes, signals, a tty and its resize), 20 MB
# files both ways, error subclasses and their codes, store addresses checked
# before any work and store failures with theirs, the GIL released while
# a call waits, asyncio (10 execs on 3 VMs at once while a 10 ms timer keeps
# ticking), context managers that clean up when the block raises, and the
# smolvm-shaped Machine end to end, `run` included with an OCI image from a
# registry on loopback. One VM serves most of it; the package comes
# preinstalled.
# timeout: 900
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
python3 --version
# The package imports from anywhere, with nothing set up.
(cd / && python3 -c 'import ferry, ferry.aio; assert callable(ferry.boot)') || fail "import ferry"
work=/root/python-sdk
mkdir -p "$work" && cd "$work"

echo "== a registry on loopback with a scratch image (static busybox)"
registry_pid=
cleanup() { [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p reg/data
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:5000\n' \
    "$work/reg/data" >reg/config.yml
docker-registry serve reg/config.yml >reg/log 2>&1 &
registry_pid=$!
cat >mkoci.py <<'PY'
# An OCI image layout with one image tagged "1": a static busybox, an env,
# a workdir and a user.
import gzip, hashlib, io, json, os, sys, tarfile

out = sys.argv[1]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)


def put(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as tar:
    def add(name, data=None, mode=0o644, uid=0, kind=tarfile.REGTYPE):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid = kind, mode, uid, uid
        if data is None:
            tar.addfile(ti)
        else:
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    add("bin", mode=0o755, kind=tarfile.DIRTYPE)
    add("bin/busybox", open("/bin/busybox", "rb").read(), mode=0o755)
    add("etc", mode=0o755, kind=tarfile.DIRTYPE)
    add("etc/passwd", b"root:x:0:0:root:/root:/bin/busybox\napp:x:1234:1234:app:/work:/bin/busybox\n")
    add("etc/group", b"root:x:0:\napp:x:1234:\n")
    add("work", mode=0o755, uid=1234, kind=tarfile.DIRTYPE)
raw = buf.getvalue()
layer = put(gzip.compress(raw, mtime=0))
config = put(json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["GREETING=hi", "PATH=/bin"], "Entrypoint": ["/bin/busybox"],
               "Cmd": ["echo", "hello"], "WorkingDir": "/work", "User": "1234:1234"},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
}).encode())
manifest = put(json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
}).encode())
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": "1"}}]}, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
PY
python3 mkoci.py "$work/layout"
for _ in $(seq 1 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:5000/v2/ || true)" = 200 ] && break
    sleep 0.5
done
skopeo --insecure-policy copy --quiet --dest-tls-verify=false "oci:$work/layout:1" \
    docker://127.0.0.1:5000/pyimg:1 || { cat reg/log; fail "push the image"; }
export FERRY_TEST_IMAGE=127.0.0.1:5000/pyimg:1

mkdir -p /srv/pyshare && echo "from the host" >/srv/pyshare/note

cat >test_sdk.py <<'PY'
import asyncio
import hashlib
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

import ferry
import ferry.aio

sha = lambda b: hashlib.sha256(b).hexdigest()
MAIN = 'trap "echo usr1 > /tmp/usr1" USR1; while :; do sleep 0.2; done'


@pytest.fixture(scope="module")
def vm():
    with ferry.boot(name="py", memory_mib=256, ports=["18080:8080"], cmd=["/bin/sh", "-c", MAIN]) as vm:
        yield vm


def names():
    return [v.name for v in ferry.list()]


def test_exec_argv_strings_codes_signals_timeout(vm):
    r = vm.exec(["echo", "a b", "$HOME"])
    assert (r.stdout, r.stderr, r.exit_code, r.signal) == (b"a b $HOME\n", b"", 0, None)
    r = vm.exec('echo "$((6 * 7))" >&2; exit 3')
    assert (r.stderr, r.exit_code) == (b"42\n", 3)
    killed = vm.exec("kill -TERM $$")
    assert (killed.exit_code, killed.signal) == (None, 15)
    assert vm.exec(["sleep", "30"], timeout=0.3).timed_out


def test_exec_stdin_env_cwd_user(vm):
    assert vm.exec(["tr", "a-z", "A-Z"], stdin="shout").stdout == b"SHOUT"
    assert vm.exec(["cat"], stdin=bytearray(b"\x00\xff")).stdout == b"\x00\xff"
    r = vm.exec('echo "$FOO $(pwd) $(id -un)"', env={"FOO": "bar"}, cwd="/tmp", user="nobody")
    assert r.stdout == b"bar /tmp nobody\n"


def test_spawn_stdin_stdout_stderr_and_exit(vm):
    child = vm.spawn(["sh", "-c", "cat; echo err >&2; exit 7"])
    assert child.pid > 1
    child.stdin.write(b"one ")
    child.stdin.write(b"two\nthree\n")
    child.stdin.close()
    assert child.stdout.readline() == b"one two\n"
    assert child.stdout.read() == b"three\n"
    assert child.stderr.read() == b"err\n"
    e = child.wait()
    assert (e.exit_code, e.signal, child.returncode) == (7, None, 7)


def test_spawn_signals(vm):
    sleeper = vm.spawn(["sleep", "100"])
    assert sleeper.poll() is None and sleeper.returncode is None
    with pytest.raises(TimeoutError):
        sleeper.wait(timeout=0.2)
    sleeper.signal("SIGTERM")
    e = sleeper.wait(30)
    assert (e.exit_code, e.signal, sleeper.returncode) == (None, 15, -15)
    trapped = vm.spawn(["sh", "-c", 'trap "echo got-usr1; exit 0" USR1; echo ready; while :; do sleep 0.1; done'])
    assert trapped.stdout.readline() == b"ready\n"
    import signal
    trapped.signal(signal.SIGUSR1)
    assert trapped.stdout.readline() == b"got-usr1\n"
    assert trapped.wait(30).exit_code == 0
    with pytest.raises(ferry.InvalidArgument):
        trapped.signal("SIGNOPE")


def test_spawn_tty_and_resize(vm):
    child = vm.spawn(["sh", "-c", "stty size; read x; stty size"], tty=True, cols=80, rows=24)
    out = b""
    while b"24 80" not in out:
        chunk = child.stdout.read1(4096)
        assert chunk, f"the pty closed early: {out!r}"
        out += chunk
    child.resize(100, 40)
    child.stdin.write(b"\n")
    assert child.wait(30).exit_code == 0
    out += child.stdout.read()
    assert b"40 100" in out, out


def test_spawn_16mb_streamed(vm):
    want = vm.exec("head -c 16777216 /dev/urandom > /tmp/r && sha256sum /tmp/r").stdout.split()[0].decode()
    child = vm.spawn(["cat", "/tmp/r"])
    h, n = hashlib.sha256(), 0
    while True:
        chunk = child.stdout.read(1 << 16)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    assert child.wait().exit_code == 0
    assert (n, h.hexdigest()) == (16 << 20, want)


def test_files_20mb_both_ways_and_staged(vm):
    big = os.urandom(20 << 20)
    vm.write_file("/tmp/big", big, mode=0o640)
    check = vm.exec('sha256sum /tmp/big | cut -d" " -f1; stat -c %a /tmp/big')
    assert check.stdout.decode() == f"{sha(big)}\n640\n"
    vm.exec("head -c 20971520 /dev/urandom > /tmp/out")
    want = vm.exec("sha256sum /tmp/out").stdout.split()[0].decode()
    back = vm.read_file("/tmp/out")
    assert (len(back), sha(back)) == (20 << 20, want)
    r = vm.exec(["/opt/staged/run.sh"], stage_files={
        "/opt/staged/run.sh": ("#!/bin/sh\nstat -c %a /opt/staged/run.sh /opt/staged/secret\ncat /opt/staged/secret\n", 0o755),
        "/opt/staged/secret": (b"s3cret", 0o600),
    })
    assert r.stdout == b"755\n600\ns3cret"


def test_workload_signal_stats_pause_list(vm):
    vm.workload_signal("USR1")
    seen = b""
    for _ in range(50):
        seen = vm.exec("cat /tmp/usr1 2>/dev/null || true").stdout
        if seen:
            break
        time.sleep(0.1)
    assert seen == b"usr1\n"
    s = vm.stats()
    assert s.vmm_rss_bytes > 0 and s.guest_resident_bytes > 0, s
    vm.pause()
    vm.resume()
    assert vm.exec(["true"]).exit_code == 0
    listed = ferry.list()
    assert [(v.name, v.status, v.cpus, v.memory_mib, v.image) for v in listed] == [("py", "running", 1, 256, "base")]
    assert listed[0].ports == ["127.0.0.1:18080:8080"]
    with vm.expose_tcp(18081, 8080) as port:
        assert port.local_addr == "127.0.0.1:18081"
        with pytest.raises(ferry.FerryError):
            vm.expose_tcp(18081, 8081)  # taken by the forward above
    vm.expose_tcp(18081, 8080).close()  # the port was freed


def test_errors_subclasses_and_codes(vm, tmp_path):
    with pytest.raises(ferry.VmNotFound) as e:
        ferry.attach("no-such-vm")
    assert isinstance(e.value, ferry.VmError) and isinstance(e.value, ferry.FerryError)
    assert (e.value.code, e.value.retryable) == ("VM_NOT_FOUND", False) and e.value.hint
    with pytest.raises(ferry.PortInUse) as e:
        ferry.boot(name="second", memory_mib=256, ports=["18080:80"])
    assert (e.value.code, e.value.retryable) == ("BOOT_PORT_FORWARD_IN_USE", True)
    assert isinstance(e.value, ferry.PortError)
    with pytest.raises(ferry.PortError) as e:
        ferry.boot(ports=["not-a-port"])
    assert e.value.code == "BOOT_PORT_FORWARD_INVALID"
    corrupt = tmp_path / "corrupt.bundle"
    corrupt.write_bytes(os.urandom(1 << 20))
    with pytest.raises(ferry.BundleError) as e:
        ferry.restore(corrupt)
    assert e.value.code.startswith("BUNDLE_")
    with pytest.raises(ferry.FileError) as e:
        vm.read_file("/no/such/file")
    assert e.value.code == "FILE_NOT_FOUND"
    with pytest.raises(ferry.ImageError) as e:
        ferry.boot(image="/no/such/image.tar")
    assert e.value.code.startswith("IMAGE_")
    with pytest.raises(ferry.InvalidArgument) as e:
        vm.exec([])
    assert e.value.code == "SDK_INVALID_ARGUMENT" and isinstance(e.value, ValueError)
    with pytest.raises(ferry.InvalidArgument):
        ferry.restore(b"not a path or a file")
    # Every documented code has a class, and nearly all a family of their own.
    codes = [c for c, _, _ in ferry.error_codes()]
    assert "VM_NOT_FOUND" in codes and len(codes) > 100
    # The containerd shim's codes (and ferry-runc's) go to containerd and
    # Docker, never to a program.
    plain = [c for c in codes
             if not c.startswith(("SHIM_", "RUNC_")) and ferry.error_class(c) is ferry.FerryError]
    assert len(plain) <= 5, plain
    assert names() == ["py"], "refused calls leave nothing behind"


def test_store_addresses_checked_first_and_failures_keep_codes(vm, tmp_path):
    with pytest.raises(ferry.StoreError) as e:
        vm.push("http://bucket/vms")
    assert (e.value.code, e.value.retryable) == ("STORE_URL_INVALID", False) and e.value.hint
    with pytest.raises(ferry.StoreError) as e:
        vm.push("s3://NO_SUCH/vms", stop=True)
    assert e.value.code == "STORE_URL_INVALID"
    with pytest.raises(ferry.InvalidArgument):
        vm.push(tmp_path)
    assert vm.exec(["true"]).exit_code == 0, "a refused push leaves the VM running"
    with pytest.raises(ferry.StoreError) as e:
        ferry.push_bundle(tmp_path / "none.bundle", "s3://")
    assert e.value.code == "STORE_URL_INVALID"
    # Fetching needs the digest of a pushed VM, not just the store.
    for fetch in (lambda: ferry.pull_bundle("s3://ferry/vms", tmp_path / "none.bundle"),
                  lambda: ferry.restore("s3://ferry/vms", name="from-store")):
        with pytest.raises(ferry.StoreError) as e:
            fetch()
        assert e.value.code == "STORE_URL_INVALID"
    with pytest.raises(ferry.InvalidArgument):
        ferry.restore(pathlib.Path("s3://ferry/vms") / ("0" * 64))
    # Access is read from the environment at each call: a child process
    # gets its own, with no server behind the endpoint or no key at all.
    code = (
        "import ferry\n"
        "try:\n"
        f"    ferry.pull_bundle('s3://ferry/vms/{'0' * 64}', {str(tmp_path / 'none.bundle')!r})\n"
        "except ferry.StoreError as e:\n"
        "    print(e.code, e.retryable)\n"
    )
    pull = lambda env: subprocess.run([sys.executable, "-c", code], env={"PATH": os.environ["PATH"], **env},
                                      check=True, capture_output=True, text=True).stdout
    assert pull({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}) == "STORE_UNREACHABLE True\n"
    assert pull({"HOME": "/nonexistent"}) == "STORE_CREDENTIALS False\n"
    assert not (tmp_path / "none.bundle").exists(), "a failed pull writes nothing"
    assert names() == ["py"]


def test_gil_released_while_a_call_waits(vm):
    counted = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counted[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)
        before = counted[0]
        t0 = time.monotonic()
        assert vm.exec(["sleep", "1"]).exit_code == 0
        spent = time.monotonic() - t0
        during = counted[0] - before
    finally:
        stop.set()
        t.join()
    print(f"GIL: the other thread counted {during} in {spent:.2f} s of a blocking exec")
    # Held, the GIL would let the other thread count nothing at all.
    assert spent >= 1.0 and during > 1000, during


def test_asyncio_10_execs_on_3_vms_while_a_timer_ticks(vm):
    async def main():
        ticks = []

        async def ticker():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        tick = asyncio.ensure_future(ticker())
        t0 = time.monotonic()
        shared = await ferry.aio.attach("py")
        a, b = await asyncio.gather(ferry.aio.boot(name="pa", memory_mib=256),
                                    ferry.aio.boot(name="pb", memory_mib=256))
        with pytest.raises(RuntimeError, match="on purpose"):
            async with a, b:
                booted = time.monotonic()
                vms = [shared, a, b]
                results = await asyncio.gather(*(
                    vms[i % 3].exec(["sh", "-c", f"date +%s.%N; sleep 2; date +%s.%N; echo {i} $(hostname)"])
                    for i in range(10)))
                ran = time.monotonic() - booted
                lines = [r.stdout.decode().split("\n") for r in results]
                assert [l[2].split()[0] for l in lines] == [str(i) for i in range(10)]
                # On each VM (one clock), every exec was in its sleep at one moment.
                by_host = {}
                for l in lines:
                    by_host.setdefault(l[2].split()[1], []).append((float(l[0]), float(l[1])))
                assert len(by_host) == 3 and {"pa", "pb"} <= set(by_host), lines
                for host, spans in by_host.items():
                    assert max(s for s, _ in spans) < min(e for _, e in spans), (host, spans)
                assert sorted(v.name for v in await ferry.aio.list()) == ["pa", "pb", "py"]
                raise RuntimeError("on purpose")
        elapsed = time.monotonic() - t0
        tick.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        print(f"ASYNCIO: {len(ticks)} ticks in {elapsed:.2f} s (boots and execs), "
              f"10 execs in {ran:.2f} s, largest gap {max(gaps) * 1000:.0f} ms")
        # 10 sleeps of 2 s, one after another, would take 20 s at the least.
        assert ran < 20.0, ran
        assert len(ticks) >= elapsed / 0.1, (len(ticks), elapsed)
        # The loop never stalls for long (emulation and a neighbouring test
        # host make single gaps of a few hundred ms).
        assert max(gaps) < 2.0, max(gaps)
        assert sorted(v.name for v in await ferry.aio.list()) == ["py"], "async with removed both"

    asyncio.run(main())


def test_asyncio_fork_files_and_spawned_streams(vm):
    async def main():
        shared = await ferry.aio.attach("py")
        async with await shared.fork(name="pf") as f:
            await f.write_file("/tmp/x", "async")
            assert await f.read_file("/tmp/x") == b"async"
            child = await f.spawn(["sh", "-c", "cat; echo end >&2; echo end"])
            await child.stdin.write(b"line1\n")
            await child.stdin.close()
            assert [line async for line in child.stdout] == [b"line1\n", b"end\n"]
            assert await child.stderr.read() == b"end\n"
            assert (await child.wait()).exit_code == 0
        assert sorted(v.name for v in await ferry.aio.list()) == ["py"]

    asyncio.run(main())


def test_snapshot_to_and_restore_from_file_objects(vm, tmp_path):
    vm.exec("echo kept > /root/state")
    bundle = tmp_path / "py.bundle"
    with open(bundle, "wb") as out:
        report = vm.snapshot(out, leave_running=True)
    # The report counts the bundle's sections; the stream also carries its framing.
    assert 0 < report.bytes <= bundle.stat().st_size
    assert vm.exec(["true"]).exit_code == 0, "the source runs on"
    # Its port stays with the source: the copy gets none.
    with open(bundle, "rb") as f, ferry.restore(f, name="thawed", ports=[]) as thawed:
        assert thawed.exec(["cat", "/root/state"]).stdout == b"kept\n"
        assert thawed.info().ports == []
    assert names() == ["py"]


def test_context_managers_clean_up_on_exceptions(vm):
    with pytest.raises(KeyError):
        with vm.fork(name="ctx") as f:
            assert f.exec(["hostname"]).stdout == b"ctx\n"
            raise KeyError("on purpose")
    with pytest.raises(ferry.VmNotFound):
        ferry.attach("ctx")
    siblings = vm.fork(count=2)
    assert len(siblings) == 2
    for s in siblings:
        with s:
            assert s.exec(["cat", "/tmp/big"]).exit_code == 0
    assert names() == ["py"]


def test_migrate_moves_a_running_vm_and_refuses_a_wrong_token():
    import threading

    mover = ferry.boot(name="pymover", memory_mib=256)
    mover.exec("echo travels > /root/note")
    receiver = ferry.listen_for_migration("127.0.0.1:0")
    arrived = {}

    def take():
        try:
            arrived["vm"] = receiver.receive(name="pymoved", ports=[])
        except Exception as e:  # reported below
            arrived["error"] = e

    t = threading.Thread(target=take)
    t.start()
    with pytest.raises(ferry.MigrateError) as refused:
        mover.migrate(receiver.address, token="0" * 32)
    assert refused.value.code == "MIGRATE_AUTH_FAILED"
    assert mover.exec(["cat", "/root/note"]).stdout == b"travels\n"
    report = mover.migrate(receiver.address, token=receiver.token, downtime_ms=500)
    t.join(120)
    assert "error" not in arrived, arrived.get("error")
    moved = arrived["vm"]
    assert moved.name == "pymoved"
    assert report["downtime_ms"] > 0 and len(report["rounds"]) >= 1, report
    assert moved.exec(["cat", "/root/note"]).stdout == b"travels\n"
    assert "pymover" not in names()
    # An incremental snapshot of the moved VM: only what changed since a base.
    base = moved.snapshot("/root/py-base.snap", leave_running=True)
    moved.exec("echo later > /root/later")
    inc = moved.snapshot("/root/py-inc.snap", leave_running=True, since="/root/py-base.snap")
    assert inc.bytes < base.bytes / 4, (inc.bytes, base.bytes)
    moved.remove()
    with ferry.restore("/root/py-inc.snap", name="pyinc", ports=[]) as back:
        assert back.exec(["cat", "/root/note", "/root/later"]).stdout == b"travels\nlater\n"


def test_warm_image_and_pool():
    warmed = []

    def warmup(vm):
        warmed.append(vm.name)
        assert vm.exec("cat /etc/app.conf").stdout == b"mode=warm\n"
        vm.exec("echo warmed > /root/warm")

    spec = dict(memory_mib=256, extra_files={"/etc/app.conf": "mode=warm\n"}, warmup=warmup, warmup_tag="py-1")
    image = ferry.Image.build(**spec)
    assert os.path.isfile(image.bundle) and image.key and len(warmed) == 1
    assert ferry.Image.build(**spec).key == image.key and len(warmed) == 1, "the second build is the cached one"
    with image.pool(min=1, max=2, acquire_timeout=60) as pool:
        with pool.acquire() as first:
            assert first.exec(["cat", "/root/warm"]).stdout == b"warmed\n"
            first.exec("echo dirty > /root/warm")
            second = pool.acquire()
            assert pool.stats().in_use == 2
            assert second.exec(["cat", "/root/warm"]).stdout == b"warmed\n"
            second.release()
        stats = pool.stats()
        assert stats.in_use == 0 and stats.max == 2, stats
    # One VM at most, held: the next caller waits, then hears POOL_EXHAUSTED.
    with ferry.Image.from_snapshot(image.bundle).pool(min=0, max=1, acquire_timeout=0.5) as small:
        held = small.acquire()
        with pytest.raises(ferry.PoolExhausted) as e:
            small.acquire()
        assert e.value.code == "POOL_EXHAUSTED" and isinstance(e.value, ferry.PoolError)
        held.release()
    # Released VMs are removed by the pool's keeper thread: give it a moment.
    for _ in range(200):
        if names() == ["py"]:
            break
        time.sleep(0.1)
    assert names() == ["py"], "shutdown removes every pooled VM"


def test_machine_smolvm_shape_end_to_end():
    from ferry import Machine, MachineConfig, MountSpec, ResourceSpec

    config = MachineConfig(
        name="mach",
        mounts=[MountSpec(source="/srv/pyshare", target="/mnt/share")],
        resources=ResourceSpec(cpus=1, memory_mb=256),
        ports=["18090:8090"],
    )
    assert Machine(config).status().state == "created"
    m = Machine.create(config)
    try:
        assert m.status().state == "running"
        r = m.exec(["cat", "/mnt/share/note"])
        assert (r.exit_code, r.stdout) == (0, "from the host\n")
        r = m.exec(["sh", "-c", "echo $X $(pwd)"], env={"X": "y"}, workdir="/tmp", timeout=30)
        assert r.stdout == "y /tmp\n"
        # A process and a file survive stop and start: the machine is frozen, not rebooted.
        m.exec(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $! > /root/pid; echo kept > /root/state"])
        pid = m.exec(["cat", "/root/pid"]).stdout.strip()
        m.stop()
        assert m.status().state == "stopped"
        with pytest.raises(ferry.FerryError):
            m.exec(["true"])
        m.start()
        assert m.status().state == "running"
        assert m.exec(["cat", "/root/state"]).stdout == "kept\n"
        assert m.exec(["kill", "-0", pid]).exit_code == 0, "the process lives on"
        # run: a command in an OCI image, with the image's env, workdir and user.
        r = m.run(os.environ["FERRY_TEST_IMAGE"], ["/bin/busybox", "sh", "-c", "echo $GREETING $(pwd) $(id -u)"])
        assert (r.exit_code, r.stdout) == (0, "hi /work 1234\n"), r
        assert sorted(names()) == ["mach", "py"], "run's VM is gone"
    finally:
        m.delete()
    assert m.status().state == "deleted"
    with pytest.raises(RuntimeError):
        with Machine(config) as again:
            try:
                again.start()
            except ferry.PortInUse:
                # Who holds the port the deleted machine had.
                os.system("ss -ltnp 'sport = :18090'; ps -eo pid,ppid,stat,etime,args | grep -v ' \\[' ")
                raise
            assert again.exec("hostname").stdout == "mach\n"
            raise RuntimeError("on purpose")
    assert names() == ["py"]


def test_machine_asyncio():
    async def main():
        config = ferry.aio.MachineConfig(name="amach", resources=ferry.aio.ResourceSpec(memory_mb=256))
        async with ferry.aio.Machine(config) as m:
            await m.start()
            assert (await m.status()).state == "running"
            r = await m.exec(["echo", "async"])
            assert r.stdout == "async\n"
            r = await m.run(os.environ["FERRY_TEST_IMAGE"], ["/bin/busybox", "echo", "from", "image"])
            assert r.stdout == "from image\n"
        assert (await m.status()).state == "deleted"
        ref = os.environ["FERRY_TEST_IMAGE"]
        assert any(ref in i.references for i in await ferry.aio.images())
        removed = await ferry.aio.remove_image(ref)
        assert removed.digest.startswith("sha256:")
        assert not any(ref in i.references for i in await ferry.aio.images())
        pulled = await ferry.aio.pull_image(ref)
        assert (pulled.digest, pulled.workdir, pulled.user) == (removed.digest, "/work", "1234:1234")
        assert pulled.command == ["/bin/busybox", "echo", "hello"]

    asyncio.run(main())
    assert names() == ["py"]
PY
python3 -m pytest -q -s -p no:cacheprovider test_sdk.py
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "the tests left VMs: $(ferry ls)"
echo "python-sdk: all passed"
