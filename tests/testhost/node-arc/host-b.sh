# The README's arc from Node.js, host-b's half: restore the counter from the
# stream host-a sends, keep counting, fork it onto another port.
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p /root/arc && cd /root/arc
cat > arc.test.mjs <<'JS'
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { restore, list } from '@ferry/runtime';

const get = async (port) => (await (await fetch(`http://127.0.0.1:${port}/`)).json()).count;

test('restore from the network, count on, fork', async () => {
  const socket = await new Promise((resolve) => {
    const server = createServer((s) => {
      server.close();
      resolve(s);
    }).listen(9000);
  });
  const h = monitorEventLoopDelay({ resolution: 10 });
  h.enable();
  let ticks = 0;
  const iv = setInterval(() => ticks++, 10);
  const t0 = performance.now();
  let bytes = 0;
  const vm = await restore({ bundle: socket, ports: ['3000:3000'], onProgress: (e) => e.bytes && (bytes = e.bytes) });
  const ms = performance.now() - t0;
  clearInterval(iv);
  h.disable();
  const p99 = h.percentile(99) / 1e6;
  console.log(`EVENT_LOOP restore from a stream: ${ms.toFixed(0)} ms, delay p99 ${p99.toFixed(1)} ms, max ${(h.max / 1e6).toFixed(1)} ms, ${ticks} ticks of the 10 ms interval, ${bytes} bytes`);
  assert.ok(p99 < 100);
  assert.equal(vm.name, 'counter');
  assert.equal(await get(3000), 3, 'the same process, counting on');
  const fork = await vm.fork({ name: 'counter-b', ports: ['3001:3000'] });
  assert.equal(await get(3000), 4);
  assert.equal(await get(3001), 4);
  // A forward added at run time reaches the fork too.
  const extra = await fork.exposeTcp(3002, 3000);
  assert.equal(extra.localAddr, '127.0.0.1:3002');
  assert.equal(await get(3002), 5);
  await extra.stop();
  assert.deepEqual((await list()).map((v) => [v.name, v.status]), [['counter', 'running'], ['counter-b', 'running']]);
  await fork.remove();
  await vm.remove();
});
JS
node --test arc.test.mjs
[ "$(ferry ls --json | jq length)" = 0 ] || fail "left VMs: $(ferry ls)"
echo "node-arc: host-b passed"
timeout 60 bash -c 'until echo arc-done | nc -N host-a 9001; do sleep 1; done'
