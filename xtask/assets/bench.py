#!/usr/bin/env python3
"""ferry's benchmark, run inside one test host by `cargo xtask bench`.

ferry and the peer (QEMU's microvm machine, same kernel, same root filesystem) are
measured side by side, interleaved run by run, and medians are compared. Lines
starting with METRIC and COUNT are the results.
"""

import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
# One group only ("restore", "migrate", "s3"), or all of them.
ONLY = os.environ.get("BENCH_ONLY") or None
MEM_MIB = 512
WORK = tempfile.mkdtemp(prefix="bench-", dir="/root")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw).stdout


STEP_TIMEOUT = 300  # seconds; a stuck step fails the benchmark instead of hanging it


def ferry(*args, check=True):
    try:
        r = subprocess.run(["ferry", *args], capture_output=True, text=True,
                           timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"ferry {' '.join(args)} did not finish within {STEP_TIMEOUT} s")
    if check and r.returncode != 0:
        raise SystemExit(f"ferry {' '.join(args)} failed: {r.stderr}")
    return r.stdout


ASSETS = json.loads(ferry("install", "--json"))
KERNEL = ASSETS["kernel"]["vmlinux"]
ROOTFS = ASSETS["rootfs"]["ext4"]


def vm_exits(pid):
    """VM exits so far of the KVM VM owned by process `pid` (KVM's debugfs stats)."""
    if not os.path.exists("/sys/kernel/debug/kvm"):
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    total = None
    for d in os.listdir("/sys/kernel/debug/kvm"):
        if d.startswith(f"{pid}-"):
            with open(f"/sys/kernel/debug/kvm/{d}/exits") as f:
                total = (total or 0) + int(f.read())
    return total


class Qemu:
    """A QEMU microvm running our kernel with /bin/sh as init on its serial port."""

    def __init__(self, incoming=None, name="q"):
        self.mon = os.path.join(WORK, f"{name}.mon")
        if os.path.exists(self.mon):
            os.unlink(self.mon)
        cmd = [
            "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm",
            "-cpu", "host,pmu=off", "-m", str(MEM_MIB), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=con", "-serial", "chardev:con",
            "-monitor", f"unix:{self.mon},server,nowait",
            "-kernel", KERNEL,
            "-append", "console=ttyS0 quiet panic=-1 reboot=t root=/dev/vda ro "
                       "init=/bin/sh -c \"echo BOOTREADY; exec /bin/sh\"",
            "-drive", f"id=root,file={ROOTFS},format=raw,if=none,snapshot=on",
            "-device", "virtio-blk-device,drive=root",
        ]
        if incoming:
            cmd += ["-incoming", f"exec:cat {incoming}"]
        self.start = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, bufsize=0)
        self.buf = b""

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def wait_for(self, pattern, timeout=120):
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return time.monotonic()
            r, _, _ = select.select([self.p.stdout], [], [], 0.05)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.buf += chunk
        raise SystemExit(f"qemu: {pattern!r} not seen; output ends {self.buf[-300:]!r}")

    def monitor(self, command):
        """Runs an HMP command and returns what the monitor printed."""
        s = socket.socket(socket.AF_UNIX)
        for _ in range(500):
            try:
                s.connect(self.mon)
                break
            except OSError:
                time.sleep(0.01)
        s.settimeout(0.3)
        out = b""
        try:
            out += s.recv(4096)
        except OSError:
            pass
        s.sendall(command.encode() + b"\n")
        try:
            while True:
                d = s.recv(4096)
                if not d:
                    break
                out += d
        except OSError:
            pass
        s.close()
        return out.decode(errors="replace")

    def resume_after_incoming(self):
        """Starts the vCPUs once the incoming state is loaded."""
        for _ in range(1000):
            self.monitor("cont")
            if "running" in self.monitor("info status"):
                return
            time.sleep(0.01)
        raise SystemExit("qemu: restored VM never ran")

    def pid(self):
        return self.p.pid

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def qemu_save(q, path):
    """Stops the guest and writes QEMU's own saved state of it to `path`."""
    q.monitor("stop")
    q.monitor(f'migrate -d "exec:cat > {path}"')
    for _ in range(3000):
        if "completed" in q.monitor("info migrate"):
            break
        time.sleep(0.02)
    else:
        raise SystemExit("qemu: migration to file did not complete")
    q.kill()


# `echo hi`'s output at the peer's shell: on a line of its own, or right after
# the prompt when the state was saved before the shell started (it then prints
# its prompt before reading the line the console has already echoed).
QEMU_HI = r"(?:\n|# )hi"


def qemu_boot_ready():
    """A booted QEMU guest sitting at its init shell."""
    q = Qemu()
    q.wait_for(r"BOOTREADY")
    return q


def rss_overhead_mib(pid):
    """Resident memory of a process minus its largest mapping (guest RAM)."""
    total, largest = 0, 0
    cur = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                cur = 0
            elif line.startswith("Rss:"):
                kb = int(line.split()[1])
                total += kb
                cur = kb
                largest = max(largest, cur)
    return (total - largest) / 1024.0


def median(xs):
    return statistics.median(xs)


def report():
    for name, (f, p) in results.items():
        ratio = f / p if p else float("nan")
        print(f"METRIC name={name} ferry={f:.6g} peer={p:.6g} ratio={ratio:.3f}", flush=True)
    for name, (f, p) in counts.items():
        print(f"COUNT name={name} ferry={f} peer={'-' if p is None else p}", flush=True)


results = {}
counts = {}


def record(name, ferry_v, peer_v):
    results[name] = (ferry_v, peer_v)


# ---- restore of a ticking guest: process start to its next console tick ----
# The guest prints TICK on its console every 20 ms with bash builtins only (a
# read with a timeout on a console nobody types into), so the first tick
# after a restore says when the guest runs again, whatever the agent does.
# ferry's console is its VM's console.log; the peer's is its stdout (the
# loop is typed into its init shell).
TICK_LOOP = "while :; do echo TICK; read -t 0.02; done"
TICK_RE = re.compile(rb"TICK\r?\n")
TIMING_RE = re.compile(r"timing: (.+?): ([0-9.]+) ms")


def vm_dir(name):
    return os.path.expanduser(f"~/.local/share/ferry/vms/{name}")


class Inotify:
    """Wake-ups on file changes. The test host has one core, shared with the
    VM being measured: waiting must cost nothing between events (polling the
    console file every 2 ms took 17 % of it), as the peer's select on its
    stdout costs nothing."""

    IN_MODIFY, IN_CREATE, IN_MOVED_TO = 0x2, 0x100, 0x80

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add(self, path, mask):
        return self.libc.inotify_add_watch(self.fd, os.fsencode(path), mask) >= 0

    def drain(self):
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self):
        os.close(self.fd)


def ferry_restore_tick(bundle, name):
    """(seconds to the first tick, seconds until `ferry restore --detach`
    returned, phase timings in ms) of one restore of `bundle`."""
    vmdir = vm_dir(name)
    console = os.path.join(vmdir, "console.log")
    os.makedirs(os.path.dirname(vmdir), exist_ok=True)
    watch = Inotify()
    watch.add(os.path.dirname(vmdir), Inotify.IN_CREATE | Inotify.IN_MOVED_TO)
    t = time.monotonic()
    p = subprocess.Popen(["ferry", "restore", bundle, "--name", name, "--detach"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "FERRY_TIMINGS": "1"})
    exited = os.pidfd_open(p.pid)
    tick = ready = None
    deadline = t + STEP_TIMEOUT
    dir_watched = False
    con, seen = None, b""
    while tick is None or ready is None:
        if time.monotonic() > deadline:
            p.kill()
            raise SystemExit(f"restore of {bundle}: no tick within {STEP_TIMEOUT} s")
        if ready is None and p.poll() is not None:
            ready = time.monotonic() - t
            if p.returncode != 0:
                raise SystemExit(f"ferry restore {bundle} failed: {p.stderr.read()}")
        if tick is None:
            if not dir_watched and os.path.isdir(vmdir):
                dir_watched = watch.add(vmdir, Inotify.IN_CREATE | Inotify.IN_MODIFY)
            if con is None and os.path.exists(console):
                con = open(console, "rb")
            if con is not None:
                seen += con.read()
                if TICK_RE.search(seen):
                    tick = time.monotonic() - t
        if tick is None or ready is None:
            waits = [watch.fd] + ([exited] if ready is None else [])
            select.select(waits, [], [], 0.5)
            watch.drain()
    watch.close()
    os.close(exited)
    if con is not None:
        con.close()
    phases = {}
    for line in p.stderr.read().splitlines():
        m = TIMING_RE.search(line)
        if m:
            phases[m.group(1)] = float(m.group(2))
    try:
        with open(os.path.join(vm_dir(name), "vmm.log")) as f:
            for line in f:
                m = TIMING_RE.search(line)
                if m:
                    phases[m.group(1)] = float(m.group(2))
    except FileNotFoundError:
        pass
    return tick, ready, phases


def bench_restore():
    """Snapshot size and restore of an idle guest, and the restore of a
    ticking guest to its next tick (`cargo xtask bench --only restore` runs
    just this)."""
    # ---- snapshot bytes of an idle 512 MiB guest, and restore ----
    # The peer's file carries no disk, so ferry's side is the thin bundle (no base
    # image); the full bundle, which restores anywhere, is reported as a count.
    ferry("boot", "--detach", "--name", "idle", "--memory", str(MEM_MIB))
    time.sleep(2)
    thin = os.path.join(WORK, "idle-thin.snap")
    ferry("snapshot", "--thin", "--leave-running", "idle", thin)
    # The same guest with its memory stored raw (`--raw-memory`, what boot
    # templates use): a bigger bundle that restore maps instead of decoding.
    raw_bundle = os.path.join(WORK, "idle-raw.snap")
    ferry("snapshot", "--raw-memory", "--leave-running", "idle", raw_bundle)
    # And with the pages it touched last compressed too (`--compact`): the
    # smallest bundle, whose restore decodes those pages before the guest runs.
    compact = os.path.join(WORK, "idle-compact.snap")
    ferry("snapshot", "--thin", "--compact", "--leave-running", "idle", compact)
    counts["snapshot_bytes_idle_compact"] = (os.path.getsize(compact), None)
    bundle = os.path.join(WORK, "idle.snap")
    ferry("snapshot", "idle", bundle)
    q = qemu_boot_ready()
    time.sleep(2)
    qstate = os.path.join(WORK, "idle.qemu")
    qemu_save(q, qstate)
    record("snapshot_bytes_idle", os.path.getsize(thin), os.path.getsize(qstate))
    counts["snapshot_bytes_idle_full_bundle"] = (os.path.getsize(bundle), None)
    manifest = json.loads(ferry("inspect", bundle, "--json"))["manifest"]
    counts["snapshot_memory_bytes_idle"] = (manifest["memory_bytes"], os.path.getsize(qstate))
    counts["snapshot_memory_bytes_stored_idle"] = (manifest["memory_stored_bytes"], os.path.getsize(qstate))

    fr, frr, qr = [], [], []
    eager, decoded, decode_ms = [], [], []
    for i in range(RUNS):
        t = time.monotonic()
        ferry("restore", raw_bundle, "--name", f"rr{i}", "--detach")
        out = ferry("exec", f"rr{i}", "--", "echo", "hi")
        frr.append(time.monotonic() - t)
        assert out.strip() == "hi"
        ferry("rm", "-f", f"rr{i}")
        t = time.monotonic()
        ferry("restore", bundle, "--name", f"r{i}", "--detach")
        out = ferry("exec", f"r{i}", "--", "echo", "hi")
        fr.append(time.monotonic() - t)
        assert out.strip() == "hi"
        stats = json.load(open(os.path.expanduser(f"~/.local/share/ferry/vms/r{i}/restore-stats.json")))
        decoded.append(stats.get("decoded_bytes", 0))
        decode_ms.append(stats.get("decode_ms", 0))
        ferry("rm", "-f", f"r{i}")
        q = Qemu(incoming=qstate, name=f"qr{i}")
        t = q.start
        q.resume_after_incoming()
        q.send("echo hi")
        qr.append(q.wait_for(QEMU_HI) - t)
        q.kill()
    # Memory present right after mapping, counted only on request (the count
    # reads the page map of all guest RAM): one more restore, not timed.
    subprocess.run(["ferry", "restore", bundle, "--name", "rstats", "--detach"], check=True,
                   capture_output=True, env={**os.environ, "FERRY_RESTORE_STATS": "1"})
    stats = json.load(open(os.path.expanduser("~/.local/share/ferry/vms/rstats/restore-stats.json")))
    eager.append(stats["eager_bytes_read"])
    ferry("rm", "-f", "rstats")
    record("restore", median(fr), median(qr))
    record("restore_raw", median(frr), median(qr))
    counts["snapshot_bytes_idle_full_bundle_raw_memory"] = (os.path.getsize(raw_bundle), None)
    counts["restore_pages_read_eagerly"] = (max(eager) // 4096, None)
    counts["restore_memory_bytes_decoded"] = (max(decoded), None)
    counts["restore_decode_ms"] = (median(decode_ms), None)

    ferry("boot", "--detach", "--name", "tick", "--memory", str(MEM_MIB), "--",
          "bash", "-c", f"exec </dev/console; {TICK_LOOP}")
    for _ in range(3000):
        if b"TICK" in open(os.path.join(vm_dir("tick"), "console.log"), "rb").read():
            break
        time.sleep(0.02)
    time.sleep(1)
    tick_bundle = os.path.join(WORK, "tick.snap")
    tick_raw = os.path.join(WORK, "tick-raw.snap")
    snap = json.loads(ferry("snapshot", "--leave-running", "--json", "tick", tick_bundle))
    # Pages the guest touched just before the snapshot, stored raw for the restore.
    counts["snapshot_prefetch_pages_tick"] = (snap["report"]["prefetch_pages"], None)
    counts["snapshot_memory_stored_bytes_tick"] = (snap["report"]["memory_stored_bytes"], None)
    ferry("snapshot", "--raw-memory", "tick", tick_raw)
    ferry("rm", "-f", "tick", check=False)
    q = qemu_boot_ready()
    q.send(f"exec bash -c '{TICK_LOOP}'")
    q.wait_for(r"TICK\r?\n")
    time.sleep(1)
    qtick = os.path.join(WORK, "tick.qemu")
    qemu_save(q, qtick)
    ft, frt, fready, qt = [], [], [], []
    phase_runs = {}
    for i in range(RUNS):
        tick, ready, phases = ferry_restore_tick(tick_bundle, f"t{i}")
        ft.append(tick)
        fready.append(ready)
        for k, v in phases.items():
            phase_runs.setdefault(k, []).append(v)
        ferry("rm", "-f", f"t{i}")
        tick, _, _ = ferry_restore_tick(tick_raw, f"tr{i}")
        frt.append(tick)
        ferry("rm", "-f", f"tr{i}")
        q = Qemu(incoming=qtick, name=f"qt{i}")
        q.resume_after_incoming()
        qt.append(q.wait_for(r"TICK\r?\n") - q.start)
        q.kill()
    record("restore_tick", median(ft), median(qt))
    record("restore_raw_tick", median(frt), median(qt))
    record("restore_ready", median(fready), median(qt))
    # Where a default-bundle restore spends its time (ms, medians; machine-speed
    # dependent, so counts, not ratios).
    for k, v in phase_runs.items():
        slug = re.sub(r"[^a-z0-9]+", "_", k.lower()).strip("_")
        counts[f"restore_phase_{slug}_ms"] = (round(median(v), 1), None)


# ---- live migration: downtime of `ferry migrate` against a frozen hand-off ----
# One 512 MiB guest rewrites a 128 MiB buffer at a fixed rate (ferry-churn)
# and is moved back and forth inside the test host: by `ferry migrate` to a
# `ferry receive` on loopback (downtime as its report gives it: from the
# pause to the VM answering on the destination), and by `ferry snapshot -
# | ferry restore -` (frozen from the snapshot's pause to the restored VM
# answering). The churn runs on across every move.
CHURN_RATE_MIB = 8


def churn_status(name):
    out = ferry("exec", name, "--", "ferry-churn", "--query", "127.0.0.1:7000")
    return dict(kv.split("=") for kv in out.split())


def migrate_once(src, dst):
    recv = subprocess.Popen(["ferry", "receive", "--listen", "127.0.0.1:0", "--name", dst,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    hello = json.loads(recv.stdout.readline())
    report = json.loads(ferry("migrate", src, hello["listening"], "--token", hello["token"],
                              "--json"))
    recv.wait(timeout=STEP_TIMEOUT)
    if recv.returncode != 0:
        raise SystemExit("ferry receive failed")
    return report


def handoff_once(src, dst):
    snap = subprocess.Popen(["ferry", "snapshot", src, "-", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=False)
    rest = subprocess.Popen(["ferry", "restore", "-", "--detach", "--name", dst],
                            stdin=snap.stdout, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    snap.stdout.close()
    _, err = snap.communicate(timeout=STEP_TIMEOUT)
    snap_end = time.monotonic()
    rest.wait(timeout=STEP_TIMEOUT)
    end = time.monotonic()
    if snap.returncode != 0 or rest.returncode != 0:
        raise SystemExit(f"hand-off failed: {err.decode()} {rest.stderr.read().decode()}")
    line = [l for l in err.decode().splitlines() if l.startswith("{")][-1]
    paused_s = json.loads(line)["report"]["paused_ms"] / 1000
    return end - (snap_end - paused_s)


def bench_migrate():
    name = "mig0"
    ferry("boot", "--detach", "--name", name, "--memory", str(MEM_MIB))
    ferry("cp", shutil.which("ferry-churn"), f"{name}:/usr/local/bin/ferry-churn")
    ferry("exec", name, "--", "sh", "-c",
          f"setsid ferry-churn --mib 128 --rate {CHURN_RATE_MIB} --port 7000 "
          "</dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + STEP_TIMEOUT
    while int(churn_status(name)["pass"]) < 1:
        if time.monotonic() > deadline:
            raise SystemExit("ferry-churn did not finish a pass")
        time.sleep(2)
    downs, handoffs, finals, rounds = [], [], [], []
    n = 0
    for i in range(min(RUNS, 3)):
        n += 1
        report = migrate_once(name, f"mig{n}")
        name = f"mig{n}"
        downs.append(report["downtime_ms"] / 1000)
        finals.append(report["final_bytes"])
        rounds.append(len(report["rounds"]))
        n += 1
        handoffs.append(handoff_once(name, f"mig{n}"))
        name = f"mig{n}"
    st = churn_status(name)
    if st["errors"] != "0":
        raise SystemExit(f"ferry-churn saw memory errors after the moves: {st}")
    ferry("rm", "-f", name)
    record("migrate_downtime", median(downs), median(handoffs))
    counts["migrate_final_bytes"] = (int(median(finals)), None)
    counts["migrate_rounds"] = (int(median(rounds)), None)



# ---- restore from an S3 store: lazy (prefetch list, memory on first touch,
# disk writes on first access) against downloading the whole bundle and
# restoring it ----
# The store is the test host's own Garage (`s3-server`). The guest holds 64
# MiB of random bytes in its tmpfs (guest memory nobody touches at first),
# 16 MiB of random bytes on its disk (disk writes nobody reads at first)
# and a counter it updates; time is from the restore command to the output
# of `ferry exec NAME -- cat /dev/shm/count`. The chunk cache is emptied
# before each lazy restore, so every byte comes from the server; what it
# holds when the output arrives is what was fetched before it. Once more on a
# host without the disk image (`s3_restore_no_image`), which then comes on
# first access too.
def store_env():
    sh("s3-server start >/dev/null")
    env = {}
    for line in open("/tmp/s3.env"):
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):]
        if "=" in line:
            k, v = line.split("=", 1)
            env[k] = v.strip("'\"")
    os.environ.update(env)


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:
                pass
    return total


def lazy_stats(name):
    path = os.path.join(vm_dir(name), "lazy-stats.json")
    for _ in range(600):
        if os.path.exists(path):
            return json.load(open(path))
        time.sleep(0.05)
    raise SystemExit(f"{name}: no lazy-stats.json")


def bench_s3_restore():
    store_env()
    cache = os.path.expanduser("~/.cache/ferry/store")
    ferry("boot", "--detach", "--name", "s3src", "--memory", str(MEM_MIB), "--",
          "bash", "-c", "head -c 67108864 /dev/urandom > /dev/shm/noise; "
          "head -c 16777216 /dev/urandom > /root/disk-noise; sync; n=0; "
          "while :; do n=$((n+1)); echo $n > /dev/shm/count; sleep 0.2; done")
    for _ in range(600):
        if subprocess.run(["ferry", "exec", "s3src", "--", "test", "-s", "/dev/shm/count"],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.5)
    pushed = json.loads(ferry("push", "s3src", "s3://ferry/bench", "--stop", "--json"))
    url = pushed["report"]["url"]
    whole = os.path.join(WORK, "s3-whole.snap")
    ferry("pull-bundle", url, whole)
    bundle_bytes = os.path.getsize(whole)
    os.remove(whole)

    def lazy_once(name, prefetch=True):
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "FERRY_STORE_PREFETCH": "on" if prefetch else "off"}
        t = time.monotonic()
        subprocess.run(["ferry", "restore", url, "--name", name, "--detach"], check=True,
                       capture_output=True, env=env, timeout=STEP_TIMEOUT)
        out = ferry("exec", name, "--", "cat", "/dev/shm/count")
        took = time.monotonic() - t
        fetched = dir_bytes(cache)
        assert out.strip().isdigit(), out
        disk = os.path.join(vm_dir(name), "disk-stats.json")
        windows = 0
        if os.path.exists(disk):
            d = json.load(open(disk))
            windows = d["demand_windows"] + d["background_windows"]
        return took, fetched, windows

    # A host without the disk image: every name this host finds it by is
    # moved aside for the restore (the pushed VM is stopped), then back.
    fcache = os.path.expanduser("~/.cache/ferry")

    def without_image(name):
        manifest = json.load(open(os.path.join(cache, "manifests", url.rsplit("/", 1)[1])))
        disk = manifest["bundle"]["disk"]
        names = [os.path.join(fcache, "bases", disk["base_id"] + ".img"),
                 os.path.join(fcache, "encoded-bases")]
        if disk.get("base_cache_path"):
            names.append(os.path.join(fcache, disk["base_cache_path"]))
        moved = [p for p in names if os.path.exists(p)]
        for p in moved:
            os.rename(p, p + ".hidden")
        try:
            took, got, _ = lazy_once(name)
            stats = json.load(open(os.path.join(vm_dir(name), "disk-stats.json")))
            assert stats["image"], stats
            return took, got
        finally:
            ferry("rm", "-f", name)
            for p in moved:
                if os.path.isdir(p):
                    shutil.rmtree(p)
                os.replace(p + ".hidden", p)

    lazy, peer, fetched, disk_windows = [], [], [], []
    faults_with, faults_without = [], []
    no_image, no_image_fetched = [], []
    for i in range(RUNS):
        took, got, windows = lazy_once(f"s3l{i}")
        lazy.append(took)
        fetched.append(got)
        disk_windows.append(windows)
        faults_with.append(lazy_stats(f"s3l{i}")["faults"])
        ferry("rm", "-f", f"s3l{i}")
        path = os.path.join(WORK, f"s3p{i}.snap")
        t = time.monotonic()
        ferry("pull-bundle", url, path)
        ferry("restore", path, "--name", f"s3p{i}", "--detach")
        out = ferry("exec", f"s3p{i}", "--", "cat", "/dev/shm/count")
        peer.append(time.monotonic() - t)
        assert out.strip().isdigit(), out
        ferry("rm", "-f", f"s3p{i}")
        os.remove(path)
        lazy_once(f"s3n{i}", prefetch=False)
        faults_without.append(lazy_stats(f"s3n{i}")["faults"])
        ferry("rm", "-f", f"s3n{i}")
        took, got = without_image(f"s3x{i}")
        no_image.append(took)
        no_image_fetched.append(got)
    record("s3_restore", median(lazy), median(peer))
    record("s3_restore_no_image", median(no_image), median(peer))
    counts["s3_no_image_fetched_before_output_per_bundle_byte"] = (
        round(median(no_image_fetched) / bundle_bytes, 3), None)
    counts["s3_bundle_bytes"] = (bundle_bytes, None)
    counts["s3_fetched_before_output_bytes"] = (int(median(fetched)), None)
    counts["s3_fetched_before_output_per_bundle_byte"] = (round(median(fetched) / bundle_bytes, 3), None)
    counts["s3_pages_faulted_with_prefetch"] = (int(median(faults_with)), None)
    counts["s3_pages_faulted_without_prefetch"] = (int(median(faults_without)), None)
    counts["s3_disk_windows"] = (len(json.load(open(os.path.join(cache, "manifests", url.rsplit("/", 1)[1])))["disk_top"]), None)
    counts["s3_disk_windows_fetched_before_output"] = (int(median(disk_windows)), None)
    sh("s3-server stop >/dev/null")


if ONLY == "s3":
    bench_s3_restore()
    report()
    sys.exit(0)

if ONLY == "restore":
    bench_restore()
    report()
    sys.exit(0)

if ONLY == "migrate":
    bench_migrate()
    report()
    sys.exit(0)


# ---- boot: command start to the first output of a command in a fresh VM ----
def ferry_boot_to_output(*extra):
    t = time.monotonic()
    p = subprocess.Popen(["ferry", "boot", *extra, "--memory", str(MEM_MIB), "--", "echo", "hi"],
                         stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], STEP_TIMEOUT)
    if not ready:
        p.kill()
        raise SystemExit(f"ferry boot {' '.join(extra)} printed nothing within {STEP_TIMEOUT} s")
    line = p.stdout.readline()
    took = time.monotonic() - t
    try:
        p.wait(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        raise SystemExit(f"ferry boot {' '.join(extra)} did not end within {STEP_TIMEOUT} s")
    assert line.strip() == "hi", line
    return took


# `ferry boot` restores a boot template of its shape when one exists: made once,
# like the kernel and image, by `ferry template create`. `boot` measures that
# path, `boot_cold` a kernel boot (`--cold`) in the same rounds.
ferry("template", "create", "--memory", str(MEM_MIB))
probe = subprocess.run(["ferry", "boot", "--memory", str(MEM_MIB), "--", "true"], text=True,
                       capture_output=True, env={**os.environ, "FERRY_TIMINGS": "1"},
                       timeout=STEP_TIMEOUT)
if "restored from template" not in probe.stderr:
    raise SystemExit(f"ferry boot did not use the template:\n{probe.stderr}")
fb, fc, qb = [], [], []
for i in range(RUNS):
    fb.append(ferry_boot_to_output())
    fc.append(ferry_boot_to_output("--cold"))
    q = Qemu()
    qb.append(q.wait_for(r"BOOTREADY") - q.start)
    q.kill()
record("boot", median(fb), median(qb))
record("boot_cold", median(fc), median(qb))
# The rest measures VMs booted from the kernel, as before templates.
ferry("template", "rm", "--all")

# VM exits from process start until the guest answers (counted while it runs).
ferry("boot", "--detach", "--name", "exits", "--memory", str(MEM_MIB))
fpid = [v for v in json.loads(ferry("ls", "--json")) if v["name"] == "exits"][0]["status"]["pid"]
fe = vm_exits(fpid)
ferry("rm", "-f", "exits")
q = qemu_boot_ready()
qe = vm_exits(q.pid())
q.kill()
if fe is not None and qe is not None:
    counts["vm_exits_boot"] = (fe, qe)

bench_restore()


# ---- fork of a running 512 MiB guest to the fork's first output ----
ferry("boot", "--detach", "--name", "src", "--memory", str(MEM_MIB))
ff, qf, paused = [], [], []
for i in range(RUNS):
    t = time.monotonic()
    out = json.loads(ferry("fork", "src", "--new-name", f"f{i}", "--detach", "--json"))
    ferry("exec", f"f{i}", "--", "echo", "hi")
    ff.append(time.monotonic() - t)
    paused.append(out["source_paused_ms"])
    if i == 0:
        counts["fork_bytes_copied"] = (out["copied_bytes"], None)
    ferry("rm", "-f", f"f{i}")
    q = qemu_boot_ready()
    t = time.monotonic()
    path = os.path.join(WORK, f"fork{i}.qemu")
    qemu_save(q, path)
    q2 = Qemu(incoming=path, name=f"qf{i}")
    q2.resume_after_incoming()
    q2.send("echo hi")
    qf.append(q2.wait_for(QEMU_HI) - t)
    q2.kill()
    os.unlink(path)
record("fork", median(ff), median(qf))
counts["fork_source_paused_ms"] = (median(paused), None)

# ---- exec round trip vs a raw vsock echo in the same VM ----
ECHO = r'''
use Socket;
socket(S, 40, SOCK_STREAM, 0) or die "socket: $!";
bind(S, pack("S S L L C x3", 40, 0, 7000, 0xFFFFFFFF, 0)) or die "bind: $!";
listen(S, 1) or die;
open(F, ">/run/echo.ready"); close(F);
accept(C, S) or die;
my $b;
while (sysread(C, $b, 1)) { syswrite(C, $b, 1); }
'''
with open(os.path.join(WORK, "echo.pl"), "w") as f:
    f.write(ECHO)
ferry("cp", os.path.join(WORK, "echo.pl"), "src:/root/echo.pl")
ferry("exec", "src", "--", "sh", "-c", "setsid perl /root/echo.pl </dev/null >/dev/null 2>&1 &")
for _ in range(100):
    if subprocess.run(["ferry", "exec", "src", "--", "test", "-e", "/run/echo.ready"]).returncode == 0:
        break
    time.sleep(0.1)
rtt = json.loads(ferry("bench-rtt", "src", "--count", "30", "--echo-port", "7000"))
record("exec_rtt", rtt["exec_rtt"], rtt["echo_rtt"])


# ---- exec against its own floor, and an agent request against the echo ----
# `ferry-exec-floor` (crates/bench-guest, static) times posix_spawn + waitpid of
# the guest's /bin/true in a loop inside the same VM, with no agent involved.
# One process start plus one vsock echo round trip is the floor of an exec:
# `exec_vs_floor` compares exec_rtt with it. `agent_rtt` compares one agent
# request that starts no process (a ping over the open session) with the echo.
def parse_exec_floor(out):
    """The JSON line `ferry-exec-floor` prints: median seconds per spawn and more."""
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"ferry-exec-floor printed no result: {out!r}")
    v = json.loads(lines[-1])
    if not isinstance(v.get("spawn_s"), (int, float)) or v["spawn_s"] <= 0:
        raise SystemExit(f"ferry-exec-floor: no spawn time in {lines[-1]!r}")
    return v


floor_bin = shutil.which("ferry-exec-floor")
if floor_bin is None:
    raise SystemExit("ferry-exec-floor is not on PATH")
ferry("cp", floor_bin, "src:/root/ferry-exec-floor")
floor = parse_exec_floor(ferry("exec", "src", "--", "/root/ferry-exec-floor",
                               "--count", "30", "--program", "/bin/true"))
print(f"exec_floor: spawn {floor['spawn_s']:.6g} s (min {floor['min_s']:.6g}, "
      f"max {floor['max_s']:.6g}, {floor['count']} runs) + echo {rtt['echo_rtt']:.6g} s; "
      f"exec_rtt {rtt['exec_rtt']:.6g} s, ping_rtt {rtt['ping_rtt']:.6g} s", flush=True)
record("exec_vs_floor", rtt["exec_rtt"], floor["spawn_s"] + rtt["echo_rtt"])
record("agent_rtt", rtt["ping_rtt"], rtt["echo_rtt"])

# ---- exec from Node.js (@ferry/runtime) against the Rust API it binds ----
# The same loop, `exec(["true"])` over the open VM `src`, through the Rust
# crate (`exec_rtt`, a ferry example) and through the Node addon, in
# alternating rounds; medians of each round's median.
NODE_RTT = r'''
import { attach } from '@ferry/runtime';
const [name, count] = process.argv.slice(2);
const vm = await attach(name);
for (let i = 0; i < 3; i++) await vm.exec(['true']);
const times = [];
for (let i = 0; i < Number(count); i++) {
  const t = process.hrtime.bigint();
  const r = await vm.exec(['true']);
  if (r.exitCode !== 0) throw new Error(`exit ${r.exitCode}`);
  times.push(Number(process.hrtime.bigint() - t) / 1e9);
}
times.sort((a, b) => a - b);
console.log(JSON.stringify({ median_s: times[Math.floor(times.length / 2)], count: times.length }));
'''
with open(os.path.join(WORK, "node_rtt.mjs"), "w") as f:
    f.write(NODE_RTT)


def rtt_of(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


node_rtts, rust_rtts = [], []
for i in range(max(RUNS, 3)):
    node_rtts.append(rtt_of(["node", os.path.join(WORK, "node_rtt.mjs"), "src", "30"]))
    rust_rtts.append(rtt_of(["exec_rtt", "src", "30"]))
record("node_exec_rtt", median(node_rtts), median(rust_rtts))

# ---- exec from Python (the ferry package) against the Rust API it binds ----
# The same loop as node_exec_rtt, through the Python extension, alternating
# rounds with the Rust crate's `exec_rtt`; medians of each round's median.
PY_RTT = r'''
import json, sys, time
import ferry
name, count = sys.argv[1], int(sys.argv[2])
vm = ferry.attach(name)
for _ in range(3):
    vm.exec(["true"])
times = []
for _ in range(count):
    t = time.perf_counter()
    r = vm.exec(["true"])
    times.append(time.perf_counter() - t)
    if r.exit_code != 0:
        raise SystemExit(f"exit {r.exit_code}")
times.sort()
print(json.dumps({"median_s": times[len(times) // 2], "count": len(times)}))
'''
with open(os.path.join(WORK, "py_rtt.py"), "w") as f:
    f.write(PY_RTT)
py_rtts, rust_rtts = [], []
for i in range(max(RUNS, 3)):
    py_rtts.append(rtt_of(["python3", os.path.join(WORK, "py_rtt.py"), "src", "30"]))
    rust_rtts.append(rtt_of(["exec_rtt", "src", "30"]))
record("py_exec_rtt", median(py_rtts), median(rust_rtts))

# ---- VMM memory beyond the guest memory it touched ----
# A fresh idle VM on each side, so guest RAM is one mapping. (A VM that was
# forked keeps its RAM in several copy-on-write mappings, which the "largest
# mapping" rule below would count as VMM memory.)
ferry("rm", "-f", "src")
ferry("boot", "--detach", "--name", "ovh", "--memory", str(MEM_MIB))
time.sleep(2)
pid = [v for v in json.loads(ferry("ls", "--json")) if v["name"] == "ovh"][0]["status"]["pid"]
q = qemu_boot_ready()
time.sleep(2)
record("vmm_overhead_mib", rss_overhead_mib(pid), rss_overhead_mib(q.pid()))
q.kill()
ferry("rm", "-f", "ovh")

# ---- pools: acquire, release + acquire, memory of idle pooled VMs ----
# One warm image: an idle VM of MEM_MIB saved once with raw memory, as
# Image.build saves warm images. `ferry bench-pool` drives
# pools of it through the Rust API. pool_acquire's peer is one Rust API exec of
# `true` (exec_rtt above), pool_cycle's a cold boot (boot_cold above). For
# idle_vm_pss_mib, IDLE_VMS pooled VMs are acquired and left alone for 30 s,
# then the PSS of their VMM processes is summed; the peer is the same for as
# many VMs booted cold.
IDLE_VMS = 20
ferry("boot", "--detach", "--name", "warm", "--memory", str(MEM_MIB))
warm = os.path.join(WORK, "warm.bundle")
ferry("snapshot", "--raw-memory", "warm", warm)
# Several minutes of restores: longer than one STEP_TIMEOUT.
r = subprocess.run(["ferry", "bench-pool", warm, "--count", "30", "--idle-vms", str(IDLE_VMS),
                    "--settle-secs", "30"], capture_output=True, text=True, timeout=3 * STEP_TIMEOUT)
if r.returncode != 0:
    raise SystemExit(f"ferry bench-pool failed: {r.stderr}")
pool = json.loads(r.stdout.strip().splitlines()[-1])
record("pool_acquire", pool["acquire_p50"], rtt["exec_rtt"])
counts["pool_acquire_p99_ms"] = (round(pool["acquire_p99"] * 1000, 3), None)
record("pool_cycle", pool["cycle_p50"], median(fc))
counts["pool_cycle_p99_ms"] = (round(pool["cycle_p99"] * 1000, 1), None)


def pss_mib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise SystemExit(f"no Pss for {pid}")


cold = []
for i in range(IDLE_VMS):
    ferry("boot", "--detach", "--cold", "--name", f"idle{i}", "--memory", str(MEM_MIB))
time.sleep(30)
pids = [v["status"]["pid"] for v in json.loads(ferry("ls", "--json")) if v["name"].startswith("idle")]
cold_pss = sum(pss_mib(p) for p in pids) / len(pids)
for i in range(IDLE_VMS):
    ferry("rm", "-f", f"idle{i}")
record("idle_vm_pss_mib", pool["idle_pss_mib"], cold_pss)

bench_migrate()
bench_s3_restore()
report()
