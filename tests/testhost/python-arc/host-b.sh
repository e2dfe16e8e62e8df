# The README's arc from Python, host-b's half: restore the counter from the
# socket host-a streams its snapshot to (read as a file object, on asyncio
# with a 10 ms timer ticking), keep counting, fork it onto another port.
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p /root/arc && cd /root/arc
cat > test_arc.py <<'PY'
import asyncio
import json
import socket
import time
import urllib.request

import ferry
import ferry.aio


def get(port):
    """The counter's next count (retried while the listener is between requests)."""
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                return json.loads(r.read())["count"]
        except (OSError, ValueError):
            time.sleep(0.2)
    raise AssertionError(f"nothing answered on {port}")


def test_restore_from_a_file_object_count_on_fork():
    with socket.create_server(("0.0.0.0", 9000)) as server:
        conn, _ = server.accept()

    async def restore():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        t0 = time.monotonic()
        with conn, conn.makefile("rb") as bundle:
            vm = await ferry.aio.restore(bundle, ports=["3000:3000"])
        elapsed = time.monotonic() - t0
        t.cancel()
        print(f"ASYNCIO restore from a socket: {elapsed:.2f} s, {ticks} ticks of the 10 ms timer")
        assert ticks >= elapsed / 0.1, (ticks, elapsed)
        return vm

    vm = asyncio.run(restore())._sync
    assert vm.name == "counter"
    assert get(3000) == 3, "the same process, counting on"
    fork = vm.fork(name="counter-b", ports=["3001:3000"])
    assert get(3000) == 4
    assert get(3001) == 4
    # A forward added at run time reaches the fork too.
    with fork.expose_tcp(3002, 3000) as extra:
        assert extra.local_addr == "127.0.0.1:3002"
        assert get(3002) == 5
    assert [(v.name, v.status) for v in ferry.list()] == [("counter", "running"), ("counter-b", "running")]
    fork.remove()
    vm.remove()
PY
python3 -m pytest -q -s -p no:cacheprovider test_arc.py
[ "$(ferry ls --json | jq length)" = 0 ] || fail "left VMs: $(ferry ls)"
echo "python-arc: host-b passed"
timeout 60 bash -c 'until echo arc-done | nc -N host-a 9001; do sleep 1; done'
