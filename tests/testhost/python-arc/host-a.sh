# The README's arc from Python, host-a's half: provision a counter image
# (a shell that keeps its count in memory, no packages to fetch), boot it
# with a port, count to 2, and stream its snapshot to host-b over a socket.
# timeout: 900
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p /root/arc && cd /root/arc
cat > counter.sh <<'SERVER'
# Answers each HTTP request with the next count; the count lives in this shell.
count=0
while :; do
    count=$((count + 1))
    printf 'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"count": %d}\n' "$count" \
        | nc -l -N 3000 >/dev/null
done
SERVER
cat > test_arc.py <<'PY'
import json
import socket
import time
import urllib.request

import ferry


def get(port):
    """The counter's next count (retried while the listener is between requests)."""
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                return json.loads(r.read())["count"]
        except (OSError, ValueError):
            time.sleep(0.2)
    raise AssertionError(f"nothing answered on {port}")


def test_provision_boot_count_hand_off():
    def install(vm):
        assert vm.exec(["sh", "-c", "command -v nc"]).exit_code == 0
        vm.write_file("/opt/counter.sh", open("counter.sh", "rb").read(), mode=0o755)

    out = ferry.provision(install=install, cmd=["/bin/sh", "/opt/counter.sh"], out="./counter.tar.gz")
    assert out.endswith("counter.tar.gz")
    vm = ferry.boot(image="./counter.tar.gz", name="counter", memory_mib=256, ports=["3000:3000"])
    assert get(3000) == 1
    assert get(3000) == 2
    # host-b listens once it is ready for the bundle.
    for i in range(600):
        try:
            sock = socket.create_connection(("host-b", 9000), timeout=30)
            break
        except OSError:
            time.sleep(0.5)
    else:
        raise AssertionError("host-b never listened")
    with sock:
        t0 = time.monotonic()
        report = vm.snapshot(sock)
        sock.shutdown(socket.SHUT_WR)
    print(f"SNAPSHOT to a socket: {report.bytes} bytes in {time.monotonic() - t0:.2f} s")
    assert report.bytes > 0
    assert ferry.list() == [], "the VM now lives in the bundle"
PY
python3 -m pytest -q -s -p no:cacheprovider test_arc.py
[ "$(ferry ls --json | jq length)" = 0 ] || fail "the handed-off VM must be gone: $(ferry ls)"
timeout 600 nc -l 9001 | grep -q arc-done || fail "host-b did not finish"
echo "python-arc: host-a passed"
