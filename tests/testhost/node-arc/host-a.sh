# The README's arc from Node.js, host-a's half: provision a counter server
# (nodejs from apt inside the VM), boot it with a port, count to 2, and
# stream its snapshot to host-b over the network.
# timeout: 1500
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p /root/arc && cd /root/arc
cat > counter.mjs <<'JS'
import { createServer } from "node:http";
let count = 0;
createServer((_, res) => res.end(JSON.stringify({ count: ++count }) + "\n")).listen(3000);
JS
cat > arc.test.mjs <<'JS'
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { execSync } from 'node:child_process';
import { connect } from 'node:net';
import { pipeline } from 'node:stream/promises';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { provision, boot } from '@ferry/runtime';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const get = async (port) => (await (await fetch(`http://127.0.0.1:${port}/`)).json()).count;
// Listening, as the guest sees it: a connection without a request does not count.
const CONNECT = "require('net').connect(3000, '127.0.0.1').on('connect', () => process.exit(0)).on('error', () => process.exit(1))";
const listening = async (vm) => {
  for (let i = 0; i < 300; i++) {
    if ((await vm.exec(['/usr/bin/node', '-e', CONNECT])).exitCode === 0) return;
    await sleep(300);
  }
  console.log(execSync(`ferry logs ${vm.name} | tail -30`).toString());
  throw new Error('the counter never listened on 3000');
};

test('provision, boot with a port, count, hand off to host-b', async () => {
  const phases = [];
  const { out } = await provision({
    install: async (vm) => {
      const r = await vm.exec('apt-get update && apt-get install -y --no-install-recommends nodejs',
        { env: { DEBIAN_FRONTEND: 'noninteractive' } });
      assert.equal(r.exitCode, 0, r.stderr.toString());
      await vm.writeFile('/opt/counter.mjs', readFileSync('./counter.mjs'));
    },
    cmd: ['/usr/bin/node', '/opt/counter.mjs'],
    out: './counter.tar.gz',
    onProgress: (e) => e.kind !== 'output' && e.kind !== 'bytes' && phases.push(`${e.kind}: ${e.text}`),
  });
  console.log(`provisioned ${out}:\n  ${phases.join('\n  ')}`);
  const vm = await boot({ image: './counter.tar.gz', name: 'counter', ports: ['3000:3000'] });
  await listening(vm);
  assert.equal(await get(3000), 1);
  assert.equal(await get(3000), 2);
  // host-b listens once it is ready for the bundle.
  let sock;
  for (let i = 0; ; i++) {
    try {
      sock = await new Promise((resolve, reject) => {
        const s = connect(9000, 'host-b', () => resolve(s));
        s.on('error', reject);
      });
      break;
    } catch (e) {
      if (i > 600) throw e;
      await sleep(500);
    }
  }
  const h = monitorEventLoopDelay({ resolution: 10 });
  h.enable();
  let ticks = 0;
  const iv = setInterval(() => ticks++, 10);
  const t0 = performance.now();
  const stream = vm.snapshotStream();
  let report;
  stream.on('report', (r) => (report = r));
  await pipeline(stream, sock);
  const ms = performance.now() - t0;
  clearInterval(iv);
  h.disable();
  const p99 = h.percentile(99) / 1e6;
  console.log(`EVENT_LOOP snapshotStream: ${ms.toFixed(0)} ms, delay p99 ${p99.toFixed(1)} ms, max ${(h.max / 1e6).toFixed(1)} ms, ${ticks} ticks of the 10 ms interval, ${report.bytes} bytes`);
  assert.ok(p99 < 100);
  assert.ok(report.bytes > 0);
});
JS
node --test arc.test.mjs
[ "$(ferry ls --json | jq length)" = 0 ] || fail "the handed-off VM must be gone: $(ferry ls)"
timeout 900 nc -l 9001 | grep -q arc-done || fail "host-b did not finish"
echo "node-arc: host-a passed"
