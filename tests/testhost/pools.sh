# Warm images and pools from @ferry/runtime: Image.build boots the base image,
# stages a file, runs an async warmup and waits for a guest listener, then
# caches its snapshot (a second build with the same inputs is a cache hit,
# another warmupTag is not); a pool of min 2 / max 4 with restoreOnRelease
# serves 12 concurrent acquire/exec/release cycles with no state passing
# between users and stats() consistent throughout; a fifth acquire while four
# are held fails with POOL_EXHAUSTED after acquireTimeoutMs; without
# restoreOnRelease a released VM is reused as it is; Image.fromSnapshot makes
# a pool from a VM's own snapshot; shutdown leaves no VM behind.
# timeout: 900
set -euo pipefail
fail() { echo "FAIL: $*"; exit 1; }
mkdir -p /root/pools && cd /root/pools
cat > pools.test.mjs <<'JS'
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { Image, boot, list, FerryError } from '@ferry/runtime';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ms = (t0) => Math.round(performance.now() - t0);

function checkStats(s, where) {
  assert.ok(s.alive === s.inUse + s.idle || s.alive > s.inUse + s.idle, `${where}: ${JSON.stringify(s)}`);
  assert.ok(s.alive <= s.max, `${where}: more than max alive: ${JSON.stringify(s)}`);
  assert.ok(s.inUse <= s.max && s.idle >= 0 && s.waiting >= 0, `${where}: ${JSON.stringify(s)}`);
}

async function waitIdle(pool, n) {
  for (let i = 0; i < 600; i++) {
    if (pool.stats().idle >= n) return;
    await sleep(100);
  }
  throw new Error(`the pool never had ${n} idle VMs: ${JSON.stringify(pool.stats())}`);
}

let image;

test('Image.build warms up, waits for the listener and caches', async () => {
  let warmed = 0;
  const opts = {
    memoryMib: 256,
    // A listener on guest port 8080 that answers once per connection.
    cmd: ['perl', '-MIO::Socket::INET', '-e',
      'my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!";'
      + ' while (my $c = $s->accept) { print $c "pong\\n"; close $c }'],
    extraFiles: { '/etc/pool-stage': 'staged\n' },
    warmup: async (vm) => {
      warmed++;
      const r = await vm.exec('cat /etc/pool-stage && echo warm > /var/tmp/warmup-ran');
      assert.equal(r.exitCode, 0, r.stderr.toString());
    },
    warmupTag: 'v1',
    listenerRequired: true,
    guestPort: 8080,
  };
  let t0 = performance.now();
  image = await Image.build(opts);
  console.log(`METRIC pool_image_build_ms=${ms(t0)}`);
  assert.equal(warmed, 1);
  t0 = performance.now();
  const again = await Image.build(opts);
  const hit = ms(t0);
  console.log(`METRIC pool_image_cached_ms=${hit}`);
  assert.equal(warmed, 1, 'the same inputs do not build again');
  assert.equal(again.bundle, image.bundle);
  assert.ok(hit < 2000, `a cache hit took ${hit} ms`);
  const other = await Image.build({ ...opts, warmupTag: 'v2' });
  assert.equal(warmed, 2, 'another warmupTag builds again');
  assert.notEqual(other.bundle, image.bundle);
  assert.equal((await list()).length, 0, 'builds leave no VM behind');
});

test('a pool of 2..4 serves 12 concurrent cycles without leaking state', async () => {
  const pool = image.pool({ min: 2, max: 4, acquireTimeoutMs: 60000, idleTimeoutMs: 60000, restoreOnRelease: true });
  await waitIdle(pool, 2);
  checkStats(pool.stats(), 'warm');
  const t0 = performance.now();
  const seen = [];
  const sampler = setInterval(() => checkStats(pool.stats(), 'during'), 50);
  try {
    const cycle = async (i) => {
      const vm = await pool.acquire();
      seen.push(vm.name);
      const r = await vm.exec(`test ! -e /tmp/leak && cat /var/tmp/warmup-ran && echo user${i} > /tmp/leak`);
      assert.equal(r.exitCode, 0, `cycle ${i} found another user's file or no warmup: ${r.stdout}${r.stderr}`);
      assert.equal(r.stdout.toString(), 'warm\n');
      await vm.release();
    };
    await Promise.all(Array.from({ length: 12 }, (_, i) => cycle(i)));
  } finally {
    clearInterval(sampler);
  }
  console.log(`METRIC pool_12_cycles_ms=${ms(t0)}`);
  assert.equal(new Set(seen).size, 12, 'restoreOnRelease: every user got a fresh VM');
  const s = pool.stats();
  checkStats(s, 'after');
  assert.equal(s.inUse, 0);
  assert.equal(s.waiting, 0);

  // Four held, a fifth waits acquireTimeoutMs and fails.
  const held = await Promise.all([1, 2, 3, 4].map(() => pool.acquire()));
  assert.equal(pool.stats().inUse, 4);
  const small = image.pool({ min: 0, max: 1, acquireTimeoutMs: 1500, restoreOnRelease: true });
  const one = await small.acquire();
  const t1 = performance.now();
  await assert.rejects(small.acquire(), (e) => e instanceof FerryError && e.code === 'POOL_EXHAUSTED');
  const waited = ms(t1);
  assert.ok(waited >= 1400 && waited < 10000, `POOL_EXHAUSTED after ${waited} ms`);
  await one.release();
  await small.shutdown();
  await Promise.all(held.map((vm) => vm.release()));
  await pool.shutdown();
  for (let i = 0; i < 100 && (await list()).length > 0; i++) await sleep(100);
  assert.deepEqual((await list()).map((v) => v.name), [], 'shutdown removes every VM');
});

test('without restoreOnRelease a VM is reused as it is', async () => {
  const pool = image.pool({ min: 1, max: 1, restoreOnRelease: false });
  const a = await pool.acquire();
  await a.exec('echo kept > /tmp/kept');
  const name = a.name;
  await a.release();
  const b = await pool.acquire();
  assert.equal(b.name, name);
  assert.equal((await b.exec('cat /tmp/kept')).stdout.toString(), 'kept\n');
  await b.release();
  await pool.shutdown();
});

test('exec stages files and chains a follow-up in one request', async () => {
  const pool = image.pool({ min: 1, max: 1 });
  const vm = await pool.acquire();
  const r = await vm.exec(['sh', '/work/job.sh'], {
    stageFiles: { '/work/job.sh': 'echo staged\n', '/work/data.bin': { data: Buffer.from([1, 2, 3]), mode: 0o600 } },
    chain: 'stat -c %a /work/data.bin; echo chained',
  });
  assert.equal(r.exitCode, 0, r.stderr.toString());
  assert.equal(r.stdout.toString(), 'staged\n600\nchained\n');
  const f = await vm.exec('echo first; exit 3', { chain: 'echo never' });
  assert.equal(f.exitCode, 3);
  assert.equal(f.stdout.toString(), 'first\n');
  const two = await vm.exec(['true'], { chain: [['echo', 'a'], ['echo', 'b']] });
  assert.equal(two.stdout.toString(), 'a\nb\n');
  await assert.rejects(vm.exec('true', { chain: 'x', stdin: 'no' }), (e) => e.code === 'SDK_INVALID_ARGUMENT');
  await vm.release();
  await pool.shutdown();
});

test('Image.fromSnapshot pools a VM of ours', async () => {
  const vm = await boot({ memoryMib: 256 });
  await vm.exec('echo mine > /var/tmp/mark');
  await vm.snapshot({ out: '/root/pools/mine.bundle' });
  const img = await Image.fromSnapshot('/root/pools/mine.bundle');
  const pool = img.pool({ min: 1, max: 2 });
  const t0 = performance.now();
  await waitIdle(pool, 1);
  const got = performance.now();
  const p = await pool.acquire();
  console.log(`METRIC pool_acquire_warm_ms=${(performance.now() - got).toFixed(1)} first_restore_ms=${Math.round(got - t0)}`);
  assert.equal((await p.exec('cat /var/tmp/mark')).stdout.toString(), 'mine\n');
  await p.release();
  await pool.shutdown();
  await assert.rejects(pool.acquire(), (e) => e instanceof FerryError && e.code === 'POOL_SHUT_DOWN');
});
JS
node --test --test-concurrency=1 pools.test.mjs || fail "the pool tests failed"
[ "$(ferry ls -q | wc -l)" = 0 ] || { ferry ls; fail "VMs were left behind"; }
echo "pools: all checks passed"
