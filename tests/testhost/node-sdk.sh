# @ferry/runtime from Node's own test runner, in one test host: exec and
# spawn (argv and strings, stdin, env/cwd/user, exit codes, signals, a tty
# and its resize, 16 MB through stdout), staged files with modes, 20 MB
# files both ways, errors with their codes, store addresses checked before
# any work and store failures with theirs, the main command signalled,
# disposal, and an event loop that keeps turning through boot, snapshot and
# restore. One VM serves most of it; the package comes preinstalled.
# timeout: 900
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
node --version
# The package loads from CommonJS too, with nothing set up.
node -e 'const f = require("@ferry/runtime"); if (typeof f.boot !== "function") process.exit(1)' \
    || fail "require(\"@ferry/runtime\")"
mkdir -p /root/node-sdk && cd /root/node-sdk
cat > sdk.test.mjs <<'JS'
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { execFileSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { boot, restore, attach, list, listenForMigration, pushBundle, pullBundle, FerryError } from '@ferry/runtime';

const sha = (b) => createHash('sha256').update(b).digest('hex');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Runs `work` while watching the event loop: its delay (p99) and a 10 ms
// interval that must keep firing.
async function watched(label, work) {
  const h = monitorEventLoopDelay({ resolution: 10 });
  h.enable();
  let ticks = 0;
  const iv = setInterval(() => ticks++, 10);
  const t0 = performance.now();
  const result = await work();
  const ms = performance.now() - t0;
  clearInterval(iv);
  h.disable();
  const p99 = h.percentile(99) / 1e6;
  const max = h.max / 1e6;
  console.log(`EVENT_LOOP ${label}: ${ms.toFixed(0)} ms, delay p99 ${p99.toFixed(1)} ms, max ${max.toFixed(1)} ms, ${ticks} ticks of the 10 ms interval`);
  assert.ok(p99 < 100, `${label}: event loop delay p99 ${p99} ms`);
  assert.ok(ticks >= Math.floor(ms / 100), `${label}: the interval fired ${ticks} times in ${ms} ms`);
  return result;
}

// The main command traps SIGUSR1 to prove workloadSignal reaches it.
const MAIN = 'trap "echo usr1 > /tmp/usr1" USR1; while :; do sleep 0.2; done';
let vm;

before(async () => {
  vm = await watched('boot', () =>
    boot({ name: 'sdk', memoryMib: 256, ports: ['18080:8080'], cmd: ['/bin/sh', '-c', MAIN] }));
});

after(async () => {
  if (vm) await vm.remove();
});

test('exec: argv, strings, exit codes, signals', async () => {
  const r = await vm.exec(['echo', 'a b', '$HOME']);
  assert.equal(r.stdout.toString(), 'a b $HOME\n');
  assert.equal(r.exitCode, 0);
  assert.equal((await vm.exec('echo "$((6 * 7))" >&2; exit 3')).stderr.toString(), '42\n');
  assert.equal((await vm.exec('exit 3')).exitCode, 3);
  const killed = await vm.exec('kill -TERM $$');
  assert.equal(killed.exitCode, null);
  assert.equal(killed.signal, 15);
  const timedOut = await vm.exec(['sleep', '30'], { timeoutMs: 300 });
  assert.equal(timedOut.timedOut, true);
});

test('exec: stdin, env, cwd, user', async () => {
  assert.equal((await vm.exec(['tr', 'a-z', 'A-Z'], { stdin: 'shout' })).stdout.toString(), 'SHOUT');
  const r = await vm.exec('echo "$FOO $(pwd) $(id -un)"', { env: { FOO: 'bar' }, cwd: '/tmp', user: 'nobody' });
  assert.equal(r.stdout.toString(), 'bar /tmp nobody\n');
});

test('exec: 16 MB through stdout intact, collected and streamed', async () => {
  const made = await vm.exec('head -c 16777216 /dev/urandom > /tmp/r && sha256sum /tmp/r');
  const want = made.stdout.toString().split(' ')[0];
  const r = await vm.exec(['cat', '/tmp/r']);
  assert.equal(r.stdout.length, 16 << 20);
  assert.equal(sha(r.stdout), want);
  const child = await vm.spawn(['cat', '/tmp/r']);
  const hash = createHash('sha256');
  let bytes = 0;
  for await (const chunk of child.stdout) {
    hash.update(chunk);
    bytes += chunk.length;
  }
  assert.deepEqual(await child.wait(), { exitCode: 0, signal: null, timedOut: false });
  assert.equal(bytes, 16 << 20);
  assert.equal(hash.digest('hex'), want);
});

test('spawn: stdin stream, exit code, a signal', async () => {
  const cat = await vm.spawn(['sh', '-c', 'cat; exit 7']);
  let out = '';
  cat.stdout.on('data', (d) => (out += d));
  cat.stdin.write('one ');
  cat.stdin.end('two');
  assert.equal((await cat.wait()).exitCode, 7);
  assert.equal(out, 'one two');
  const sleeper = await vm.spawn(['sleep', '100']);
  assert.ok(sleeper.pid > 1);
  await sleeper.signal('SIGKILL');
  assert.deepEqual(await sleeper.wait(), { exitCode: null, signal: 9, timedOut: false });
});

test('spawn: a tty and its resize', async () => {
  const child = await vm.spawn(['sh', '-c', 'stty size; read x; stty size'], { tty: true, cols: 80, rows: 24 });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  while (!out.includes('24 80')) await sleep(50);
  await child.resize(100, 40);
  child.stdin.write('\n');
  assert.equal((await child.wait()).exitCode, 0);
  assert.match(out, /40 100/);
});

test('files: stageFiles with modes, 20 MB both ways', async () => {
  const r = await vm.exec(['/opt/staged/run.sh'], {
    stageFiles: {
      '/opt/staged/run.sh': { data: '#!/bin/sh\nstat -c %a /opt/staged/run.sh /opt/staged/secret\ncat /opt/staged/secret\n', mode: 0o755 },
      '/opt/staged/secret': { data: Buffer.from('s3cret'), mode: 0o600 },
    },
  });
  assert.equal(r.stdout.toString(), '755\n600\ns3cret');
  const big = randomBytes(20 << 20);
  await vm.writeFile('/tmp/big', big, { mode: 0o640 });
  const check = await vm.exec('sha256sum /tmp/big | cut -d" " -f1; stat -c %a /tmp/big');
  assert.equal(check.stdout.toString(), `${sha(big)}\n640\n`);
  const back = await vm.readFile('/tmp/big');
  assert.equal(back.length, big.length);
  assert.ok(back.equals(big));
});

test('workloadSignal reaches the main command; stats; pause and resume', async () => {
  await vm.workloadSignal('SIGUSR1');
  let seen = '';
  for (let i = 0; i < 50 && !seen; i++) {
    seen = (await vm.exec('cat /tmp/usr1 2>/dev/null || true')).stdout.toString();
    if (!seen) await sleep(100);
  }
  assert.equal(seen, 'usr1\n');
  const s = await vm.stats();
  assert.ok(s.vmmRssBytes > 0 && s.guestResidentBytes > 0, JSON.stringify(s));
  await vm.pause();
  await vm.resume();
  assert.equal((await vm.exec(['true'])).exitCode, 0);
  const listed = await list();
  assert.deepEqual(listed.map((v) => [v.name, v.status, v.memoryMib]), [['sdk', 'running', 256]]);
  assert.deepEqual(listed[0].ports, ['127.0.0.1:18080:8080']);
});

test('errors carry stable codes', async () => {
  await assert.rejects(attach('no-such-vm'), (e) => {
    assert.ok(e instanceof FerryError);
    assert.equal(e.code, 'VM_NOT_FOUND');
    assert.equal(e.retryable, false);
    assert.ok(e.hint);
    return true;
  });
  await assert.rejects(boot({ name: 'second', memoryMib: 256, ports: ['18080:80'] }), (e) => {
    assert.equal(e.code, 'BOOT_PORT_FORWARD_IN_USE');
    assert.match(e.message + (e.hint ?? ''), /sdk/, 'the holder is named');
    assert.equal(e.retryable, true);
    return true;
  });
  writeFileSync('/root/corrupt.bundle', randomBytes(1 << 20));
  await assert.rejects(restore({ bundle: '/root/corrupt.bundle' }), (e) => {
    assert.match(e.code, /^BUNDLE_/);
    return true;
  });
  await assert.rejects(boot({ ports: ['not-a-port'] }), { code: 'BOOT_PORT_FORWARD_INVALID' });
  await assert.rejects(vm.exec([]), { code: 'SDK_INVALID_ARGUMENT' });
  assert.deepEqual((await list()).map((v) => v.name), ['sdk'], 'refused calls leave nothing behind');
});

test('store: bad addresses fail before any work; store failures keep their codes', async () => {
  const storeError = (code, retryable) => (e) => {
    assert.ok(e instanceof FerryError, String(e));
    assert.equal(e.code, code, e.message);
    assert.equal(e.retryable, retryable);
    return true;
  };
  await assert.rejects(vm.push('http://bucket/vms'), storeError('STORE_URL_INVALID', false));
  await assert.rejects(vm.push('s3://NO_SUCH/vms', { stop: true }), storeError('STORE_URL_INVALID', false));
  await assert.rejects(vm.push(42), { code: 'SDK_INVALID_ARGUMENT' });
  await assert.rejects(pushBundle('/root/none.bundle', 's3://'), storeError('STORE_URL_INVALID', false));
  // Fetching needs the digest of a pushed VM, not just the store.
  await assert.rejects(pullBundle('s3://ferry/vms', '/root/none.bundle'), storeError('STORE_URL_INVALID', false));
  await assert.rejects(restore({ bundle: 's3://ferry/vms', name: 'from-store' }), storeError('STORE_URL_INVALID', false));
  assert.equal((await vm.exec(['true'])).exitCode, 0, 'a refused push leaves the VM running');
  // Access is read from the environment at each call: a child process
  // gets its own, with no server behind the endpoint or no key at all.
  const url = `s3://ferry/vms/${'0'.repeat(64)}`;
  const pull = (env) => JSON.parse(execFileSync(process.execPath, ['-e', `
    require('@ferry/runtime').pullBundle(${JSON.stringify(url)}, '/root/none.bundle')
      .then(() => console.log('{}'), (e) => console.log(JSON.stringify({ code: e.code, retryable: e.retryable })));`],
  { env: { PATH: process.env.PATH, ...env } }).toString());
  assert.deepEqual(pull({ AWS_ACCESS_KEY_ID: 'k', AWS_SECRET_ACCESS_KEY: 's', AWS_REGION: 'us-east-1', AWS_ENDPOINT_URL: 'http://127.0.0.1:9' }),
    { code: 'STORE_UNREACHABLE', retryable: true });
  assert.deepEqual(pull({ HOME: '/nonexistent' }), { code: 'STORE_CREDENTIALS', retryable: false });
  assert.ok(!existsSync('/root/none.bundle'), 'a failed pull writes nothing');
  assert.deepEqual((await list()).map((v) => v.name), ['sdk']);
});

test('snapshot and restore keep the loop turning; asyncDispose stops and removes', async () => {
  await vm.exec('echo kept > /root/state');
  const events = [];
  const report = await watched('snapshot', () =>
    vm.snapshot({ outDir: '/root/sdk.snap', leaveRunning: true, onProgress: (e) => events.push(e.kind) }));
  assert.ok(report.bytes > 0);
  assert.deepEqual([events[0], events.at(-1)], ['started', 'finished']);
  const copy = await watched('restore', () => restore({ snapDir: '/root/sdk.snap', name: 'copy', ports: [] }));
  assert.equal((await copy.exec(['cat', '/root/state'])).stdout.toString(), 'kept\n');
  assert.equal((await vm.exec(['true'])).exitCode, 0, 'the source runs on');
  await copy[Symbol.asyncDispose]();
  assert.deepEqual((await list()).map((v) => v.name), ['sdk']);
});

test('fork with a count gives siblings that share the past', async () => {
  await vm.exec('echo before > /root/past');
  const siblings = await vm.fork({ count: 2 });
  assert.equal(siblings.length, 2);
  for (const s of siblings) {
    assert.equal((await s.exec(['cat', '/root/past'])).stdout.toString(), 'before\n');
    await s.remove();
  }
  assert.deepEqual((await list()).map((v) => v.name), ['sdk']);
});

test('migrate moves a running VM live; a wrong token is refused first', async () => {
  const mover = await boot({ name: 'mover', memoryMib: 256 });
  await mover.exec('echo travels > /root/note');
  const receiver = await listenForMigration({ listen: '127.0.0.1:0' });
  assert.match(receiver.token, /^[0-9a-f]{32}$/);
  // Same host: another name, and no forwards (the source holds its own).
  const arriving = receiver.receive({ name: 'moved', ports: [] });
  await assert.rejects(mover.migrate(receiver.address, { token: 'f'.repeat(32) }), (e) => {
    assert.ok(e instanceof FerryError);
    assert.equal(e.code, 'MIGRATE_AUTH_FAILED');
    return true;
  });
  assert.equal((await mover.exec(['cat', '/root/note'])).stdout.toString(), 'travels\n', 'still here after the refusal');
  const report = await mover.migrate(receiver.address, { token: receiver.token, downtimeMs: 500 });
  const moved = await arriving;
  assert.equal(moved.name, 'moved');
  assert.ok(report.rounds.length >= 1 && report.downtime_ms > 0, JSON.stringify(report));
  assert.equal((await moved.exec(['cat', '/root/note'])).stdout.toString(), 'travels\n');
  assert.deepEqual((await list()).map((v) => v.name), ['moved', 'sdk']);
  // An incremental snapshot: only what changed since a base of this VM.
  const base = await moved.snapshot({ out: '/root/js-base.snap', leaveRunning: true });
  await moved.exec('echo later > /root/later');
  const inc = await moved.snapshot({ out: '/root/js-inc.snap', leaveRunning: true, since: '/root/js-base.snap' });
  assert.ok(inc.bytes < base.bytes / 4, `${inc.bytes} of ${base.bytes}`);
  await moved.remove();
  const back = await restore({ bundle: '/root/js-inc.snap', name: 'jsinc', ports: [] });
  assert.equal((await back.exec(['cat', '/root/note', '/root/later'])).stdout.toString(), 'travels\nlater\n');
  await back.remove();
});
JS
node --test sdk.test.mjs
ferry ls --json | jq -e 'length == 0' >/dev/null || fail "the tests left VMs: $(ferry ls)"
echo "node-sdk: all passed"
