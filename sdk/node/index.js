'use strict';
// @ferry/runtime: ferry's microVMs from Node.js. A thin layer over the native
// addon (ferry.node, built from src/ with napi-rs): it turns callbacks into
// streams, option shapes into the addon's, and failures into FerryError.

const path = require('node:path');
const os = require('node:os');
const fs = require('node:fs');
const { EventEmitter } = require('node:events');
const { Readable, Writable } = require('node:stream');

const native = require(path.join(__dirname, 'ferry.node'));

/** The file a snapshot directory (`outDir`, `snapDir`) holds. */
const BUNDLE_IN_DIR = 'vm.bundle';

const asyncDispose = Symbol.asyncDispose ?? Symbol.for('nodejs.asyncDispose');

/** Every failure of this package: a stable code, a message, a hint. */
class FerryError extends Error {
  constructor({ code, message, hint, retryable }) {
    super(message);
    this.name = 'FerryError';
    this.code = code;
    this.hint = hint ?? null;
    this.retryable = Boolean(retryable);
  }
}

/**
 * Wraps an `onProgress` callback so that a call can wait for its "finished"
 * event: the addon sends events from the thread doing the work, and Node may
 * run the call's resolution before that last event reaches JavaScript.
 * `settled()` resolves once "finished" (or "error") was delivered, or after
 * a short bound, so a caller never waits on an event that will not come.
 */
function tracked(onProgress) {
  if (!onProgress) return { cb: undefined, settled: async () => {} };
  let seen;
  const done = new Promise((resolve) => { seen = resolve; });
  const cb = (e) => {
    try {
      onProgress(e);
    } finally {
      if (e && (e.kind === 'finished' || e.kind === 'error')) seen();
    }
  };
  const settled = async () => {
    let timer;
    const bound = new Promise((r) => { timer = setTimeout(r, 2000); });
    await Promise.race([done, bound]);
    clearTimeout(timer);
  };
  return { cb, settled };
}

function fromJson(text) {
  try {
    const o = JSON.parse(text);
    if (o && o.ferryError) return new FerryError(o);
  } catch {
    // not one of ours
  }
  return null;
}

// The addon rejects with the JSON of a failure; its argument checks (napi's
// type conversions) reject with plain text.
function toFerryError(e) {
  if (e instanceof FerryError) return e;
  const text = e && typeof e.message === 'string' ? e.message : String(e);
  return (
    fromJson(text) ??
    new FerryError({
      code: 'SDK_INVALID_ARGUMENT',
      message: text,
      hint: 'see the option types in index.d.ts',
      retryable: false,
    })
  );
}

async function call(f) {
  try {
    return await f();
  } catch (e) {
    throw toFerryError(e);
  }
}

function invalid(message) {
  return new FerryError({ code: 'SDK_INVALID_ARGUMENT', message, hint: null, retryable: false });
}

// "3000:3000", 3000, or { host, guest, hostIp } → "[HOST_IP:]HOST:GUEST".
function portSpec(p) {
  if (typeof p === 'string') return p;
  if (typeof p === 'number') return `${p}:${p}`;
  if (p && typeof p === 'object' && p.host !== undefined) {
    const s = `${p.host}:${p.guest ?? p.host}`;
    if (!p.hostIp) return s;
    return p.hostIp.includes(':') ? `[${p.hostIp}]:${s}` : `${p.hostIp}:${s}`;
  }
  throw invalid(`port ${JSON.stringify(p)}: expected "HOST:GUEST" or { host, guest, hostIp }`);
}

function portSpecs(ports) {
  if (ports === undefined || ports === null) return undefined;
  if (!Array.isArray(ports)) throw invalid('ports must be an array');
  return ports.map(portSpec);
}

function mountSpecs(mounts) {
  if (mounts === undefined || mounts === null) return undefined;
  if (!Array.isArray(mounts)) throw invalid('mounts must be an array');
  return mounts.map((m) => (typeof m === 'string' ? m : `${m.host}:${m.guest}`));
}

function toBuffer(data, what) {
  if (Buffer.isBuffer(data)) return data;
  if (typeof data === 'string') return Buffer.from(data);
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  throw invalid(`${what} must be a Buffer, Uint8Array or string`);
}

function signalNumber(sig) {
  if (typeof sig === 'number') return sig;
  const n = os.constants.signals[sig];
  if (n === undefined) throw invalid(`unknown signal ${sig}`);
  return n;
}

function execOpts(o = {}) {
  return {
    env: o.env,
    cwd: o.cwd,
    user: o.user === undefined ? undefined : String(o.user),
    stdin: o.stdin === undefined || o.stdin === null ? undefined : toBuffer(o.stdin, 'stdin'),
    timeoutMs: o.timeoutMs,
    tty: o.tty,
    cols: o.cols,
    rows: o.rows,
  };
}

function isReadable(x) {
  return x && typeof x === 'object' && typeof x[Symbol.asyncIterator] === 'function';
}

/** A running command in a VM (from `vm.spawn`). */
class Child extends EventEmitter {
  constructor() {
    super();
    this._native = null;
    this._paused = false;
    this._exit = null;
    this.stdout = new Readable({ read: () => this._flow(false), highWaterMark: 1 << 20 });
    this.stderr = new Readable({ read() {} });
    this.stdin = new Writable({
      write: (chunk, _enc, cb) => {
        this._native.write(chunk).then(() => cb(), (e) => cb(toFerryError(e)));
      },
      final: (cb) => {
        this._native.closeStdin().then(() => cb(), (e) => cb(toFerryError(e)));
      },
    });
    this._done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // Rejections are also reported through wait(); never unhandled here.
    this._done.catch(() => {});
  }

  _flow(pause) {
    this._paused = pause;
    if (!this._native) return;
    if (pause) this._native.pause();
    else this._native.resume();
  }

  _attach(n) {
    this._native = n;
    this.pid = n.pid;
    if (this._paused) n.pause();
  }

  _event(ev) {
    switch (ev.kind) {
      case 'stdout':
        if (!this.stdout.push(ev.data)) this._flow(true);
        break;
      case 'stderr':
        this.stderr.push(ev.data);
        break;
      case 'exit':
        this._exit = { exitCode: ev.exitCode ?? null, signal: ev.signal ?? null, timedOut: Boolean(ev.timedOut) };
        this.stdout.push(null);
        this.stderr.push(null);
        this._resolve(this._exit);
        this.emit('exit', this._exit);
        break;
      case 'error': {
        const err = fromJson(ev.error) ?? new FerryError({ code: 'AGENT_PROTOCOL', message: ev.error });
        this.stdout.destroy(err);
        this.stderr.destroy(err);
        this._reject(err);
        break;
      }
    }
  }

  /** Sends a signal (a number or a name like "SIGTERM"). */
  signal(sig) {
    return call(() => this._native.signal(signalNumber(sig)));
  }

  /** Resizes its pseudo-terminal. */
  resize(cols, rows) {
    return call(() => this._native.resize(cols, rows));
  }

  /** Waits for it to end; output nobody reads is discarded. */
  wait() {
    if (this.stdout.readableFlowing === null) this.stdout.resume();
    if (this.stderr.readableFlowing === null) this.stderr.resume();
    return this._done;
  }
}

/** A port forward added at run time (`vm.exposeTcp`). */
class Exposed {
  constructor(n) {
    this._native = n;
    this.localAddr = n.localAddr;
  }

  /** Stops forwarding and frees the host port. */
  stop() {
    return call(() => this._native.stop());
  }
}

/** A VM on this host. VMs live in their own processes: they outlive this one. */
class Vm {
  constructor(n) {
    this._native = n;
    this.name = n.name;
  }

  /**
   * Runs a command to its end. A string runs with `sh -c`, an array as argv.
   * A non-zero exit resolves with its exitCode.
   */
  async exec(cmd, opts = {}) {
    const argvOf = (c) => (typeof c === 'string' ? ['/bin/sh', '-c', c] : c);
    const argv = argvOf(cmd);
    if (!Array.isArray(argv)) throw invalid('the command must be a string or an array');
    let r;
    if (opts.stageFiles !== undefined || opts.chain !== undefined) {
      // Files, the command and its follow-ups in one request to the agent.
      if (opts.stdin !== undefined) throw invalid('stdin does not go with stageFiles or chain');
      const chain = opts.chain === undefined ? []
        : (Array.isArray(opts.chain) && opts.chain.some((c) => Array.isArray(c) || typeof c !== 'string')
          ? opts.chain : [opts.chain]).map(argvOf);
      if (chain.some((c) => !Array.isArray(c))) throw invalid('chain must be a command or a list of commands');
      const files = Object.entries(opts.stageFiles ?? {}).map(([file, spec]) => {
        const plain = typeof spec === 'string' || spec instanceof Uint8Array;
        return { path: file, data: toBuffer(plain ? spec : spec.data, `staged file ${file}`), mode: plain ? 0o644 : (spec.mode ?? 0o644) };
      });
      const steps = [argv, ...chain].map((c) => c.map(String));
      r = await call(() => this._native.execBatch(files, steps, execOpts(opts)));
    } else {
      r = await call(() => this._native.exec(argv.map(String), execOpts(opts)));
    }
    return { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode ?? null, signal: r.signal ?? null, timedOut: r.timedOut };
  }

  /** Starts a command and returns at once with its streams. */
  async spawn(argv, opts = {}) {
    if (typeof argv === 'string') argv = ['/bin/sh', '-c', argv];
    if (!Array.isArray(argv)) throw invalid('the command must be a string or an array');
    const child = new Child();
    const o = { ...execOpts(opts), openStdin: true };
    const n = await call(() => this._native.spawn(argv.map(String), o, (ev) => child._event(ev)));
    child._attach(n);
    return child;
  }

  /** Writes a guest file (mode 0o644 unless given). */
  writeFile(file, data, { mode = 0o644 } = {}) {
    return call(() => this._native.writeFile(file, toBuffer(data, 'data'), mode ?? 0o644));
  }

  /** Reads a guest file. */
  async readFile(file) {
    const f = await call(() => this._native.readFile(file));
    return f.data;
  }

  /**
   * Freezes the VM into a bundle file (`out`) or a directory (`outDir`).
   * Unless `leaveRunning`, the VM is handed off: it stops and lives on in the bundle.
   */
  async snapshot({ out, outDir, leaveRunning, thin, rawMemory, compact, since, onProgress } = {}) {
    if (!out && !outDir) throw invalid('snapshot needs out or outDir');
    if (outDir) {
      await fs.promises.mkdir(outDir, { recursive: true });
      out = path.join(outDir, BUNDLE_IN_DIR);
    }
    // An incremental bundle's parent: a bundle file, or a snapshot directory.
    if (since !== undefined && since !== null) {
      if (typeof since !== 'string') throw invalid('since must be the path of an earlier snapshot');
      const st = await fs.promises.stat(since).catch(() => null);
      if (st && st.isDirectory()) since = path.join(since, BUNDLE_IN_DIR);
    }
    const progress = tracked(onProgress);
    const report = await call(() =>
      this._native.snapshot(out, { leaveRunning, thin, rawMemory, compact, since: since ?? undefined }, progress.cb),
    );
    await progress.settled();
    return { ...report, path: out };
  }

  /** Freezes the VM into a bundle streamed as a Readable. If the stream fails, the VM runs on. */
  snapshotStream({ leaveRunning, thin, rawMemory, compact, onProgress } = {}) {
    let ended = false;
    let native = null;
    const stream = new Readable({
      read: () => native && native.resume(),
      destroy: (err, cb) => {
        if (!ended && native) native.cancel();
        cb(err);
      },
    });
    const onChunk = (ev) => {
      if (ev.kind === 'data') {
        if (!stream.push(ev.data)) native.pause();
      } else if (ev.kind === 'end') {
        ended = true;
        stream.report = ev.report;
        stream.emit('report', ev.report);
        stream.push(null);
      } else {
        ended = true;
        stream.destroy(fromJson(ev.error) ?? new FerryError({ code: 'SNAPSHOT_STREAM_BROKEN', message: ev.error }));
      }
    };
    try {
      native = this._native.snapshotStream({ leaveRunning, thin, rawMemory, compact }, onChunk, onProgress);
    } catch (e) {
      throw toFerryError(e);
    }
    return stream;
  }

  /**
   * Forks the VM into a sibling (or `count` siblings: then an array, and
   * `ports` is one array per sibling).
   */
  async fork({ name, names, count, ports } = {}) {
    const many = count !== undefined || names !== undefined;
    const o = {
      names: names ?? (name ? [name] : undefined),
      count,
      ports: ports === undefined ? undefined : many ? ports.map(portSpecs) : [portSpecs(ports)],
    };
    const made = await call(() => this._native.fork(o));
    const vms = made.map((n) => new Vm(n));
    return many ? vms : vms[0];
  }

  /**
   * Migrates the running VM live to another host: `dest` is the `HOST:PORT`
   * of a receiver (`listenForMigration()` or `ferry receive --listen`), with
   * its `token`; or give `via`, a shell command whose stdin and stdout reach
   * `ferry receive --stdio`. Resolves to the report once the VM runs there
   * (this VM is then gone); on failure the VM runs on here.
   */
  async migrate(dest, { token, downtimeMs, bandwidthLimit, via } = {}) {
    const text = await call(() =>
      this._native.migrate(dest ?? '-', { token, downtimeMs, bandwidthLimit, via }),
    );
    return JSON.parse(text);
  }

  /**
   * Pushes the VM to an S3 store (`s3://BUCKET/PREFIX`) as content-addressed
   * chunks, of which only those the store lacks are uploaded. The VM keeps
   * running unless `stop`. Resolves to the report; its `url` restores the VM
   * anywhere (`restore({ bundle: url })`). Credentials come from the AWS
   * environment variables or ~/.aws.
   */
  async push(store, { stop = false, onProgress } = {}) {
    if (typeof store !== 'string') throw invalid('push needs the store, s3://BUCKET/PREFIX');
    const progress = tracked(onProgress);
    const report = await call(() => this._native.push(store, Boolean(stop), progress.cb));
    await progress.settled();
    return report;
  }

  /** Stops its vCPUs; memory and forwards stay. */
  pause() {
    return call(() => this._native.pause());
  }

  /** Lets a paused VM run again. */
  resume() {
    return call(() => this._native.resume());
  }

  /** Asks the guest to power off, and ends it after timeoutMs (10 s). */
  stop({ timeoutMs = 10000 } = {}) {
    return call(() => this._native.stop(timeoutMs));
  }

  /** Ends the VM if it runs and deletes its state. */
  remove() {
    return call(() => this._native.remove());
  }

  /** Forwards host port hostPort (on 127.0.0.1 unless hostIp) to guestPort. */
  async exposeTcp(hostPort, guestPort, { hostIp } = {}) {
    const spec = portSpec({ host: hostPort, guest: guestPort ?? hostPort, hostIp });
    return new Exposed(await call(() => this._native.exposeTcp(spec)));
  }

  /** Sends a signal to the VM's main command. */
  workloadSignal(sig) {
    return call(() => this._native.workloadSignal(signalNumber(sig)));
  }

  /** Memory use of the VM. */
  stats() {
    return call(() => this._native.stats());
  }

  /** What list() shows of it. */
  info() {
    return call(() => this._native.info()).then(info);
  }

  /** Stops and removes the VM (`await using vm = await boot()`). */
  async [asyncDispose]() {
    try {
      await this.stop({ timeoutMs: 2000 });
    } catch {
      // not running: removing is all there is to do
    }
    await this.remove();
  }
}

function info(i) {
  return {
    name: i.name,
    status: i.status,
    reason: i.reason ?? null,
    cpus: i.cpus,
    memoryMib: i.memoryMib,
    ports: i.ports,
    image: i.image,
  };
}

/** Boots a VM and resolves once its guest agent answers. */
async function boot(opts = {}) {
  const o = {
    image: opts.image,
    name: opts.name,
    cpus: opts.cpus,
    memoryMib: opts.memoryMib,
    ports: portSpecs(opts.ports),
    mounts: mountSpecs(opts.mounts),
    liveMounts: mountSpecs(opts.liveMounts),
    net: opts.net,
    env: opts.env,
    workdir: opts.workdir,
    cmd: typeof opts.cmd === 'string' ? ['/bin/sh', '-c', opts.cmd] : opts.cmd,
    cold: opts.cold,
    ephemeral: opts.ephemeral,
  };
  return new Vm(await call(() => native.boot(o)));
}

/**
 * Bakes an image: boots the base (or `image`) with networking, lets
 * `install(vm)` prepare it, sets the main command and writes the rootfs
 * tarball `out`. The VM is removed at the end.
 */
async function provision({ image, install, cmd, env, workdir, out, cpus, memoryMib, onProgress } = {}) {
  if (!out) throw invalid('provision needs out');
  const report = (kind, text) => onProgress && onProgress({ step: 'provision', kind, text });
  report('started', `booting ${image ?? 'the base image'}`);
  const vm = await boot({ image, cpus, memoryMib, net: true, ephemeral: true });
  try {
    await call(() => vm._native.syncClock());
    if (install) await install(vm);
  } catch (e) {
    await vm.remove().catch(() => {});
    throw e;
  }
  const argv = typeof cmd === 'string' ? ['/bin/sh', '-c', cmd] : cmd;
  const progress = tracked(onProgress);
  const written = await call(() => vm._native.bake({ out, cmd: argv, env, workdir }, progress.cb));
  await progress.settled();
  return { out: written };
}

/**
 * Thaws a bundle: a file path, a VM pushed to a store
 * (`s3://BUCKET/PREFIX/DIGEST`, fetched first) or a Node Readable (`bundle`),
 * or a snapshot directory (`snapDir`). VMs always run in their own process;
 * `detach` is accepted for the shape of other runtimes and changes nothing.
 */
async function restore({ bundle, snapDir, name, ports, net, liveMounts, trustBundleConfig, parents, onProgress } = {}) {
  const o = { name, ports: portSpecs(ports), net, liveMounts, trustBundleConfig, parents };
  if (snapDir) bundle = path.join(snapDir, BUNDLE_IN_DIR);
  const progress = tracked(onProgress);
  if (typeof bundle === 'string') {
    const vm = new Vm(await call(() => native.restorePath(bundle, o, progress.cb)));
    await progress.settled();
    return vm;
  }
  if (!isReadable(bundle)) throw invalid('restore needs bundle (a path or a Readable) or snapDir');
  const rs = await call(() => native.restoreStream(o, progress.cb));
  const feeding = (async () => {
    try {
      for await (const chunk of bundle) {
        if (!(await rs.push(toBuffer(chunk, 'a bundle chunk')))) break;
      }
      rs.end();
    } catch (e) {
      rs.abort(`the bundle stream failed: ${e && e.message ? e.message : e}`);
    }
  })();
  try {
    const vm = new Vm(await call(() => rs.finish()));
    await progress.settled();
    return vm;
  } finally {
    await feeding;
  }
}

/** Opens an existing VM by name. */
/**
 * Listens for a VM migrating here. The receiver's `token` and `address` are
 * for the source's `vm.migrate(address, { token })`; `receive()` resolves
 * to the VM once it runs here (connections with a wrong token are refused
 * and the wait goes on).
 */
async function listenForMigration({ listen = '0.0.0.0:0' } = {}) {
  const r = await call(() => native.listenForMigration(listen));
  return {
    token: r.token,
    address: r.address,
    async receive({ name, ports, net, liveMounts, trustBundleConfig } = {}) {
      const o = { name, ports: portSpecs(ports), net, liveMounts, trustBundleConfig };
      return new Vm(await call(() => r.receive(o)));
    },
  };
}

async function attach(name) {
  return new Vm(await call(() => native.attach(name)));
}

/** Every VM on this host, sorted by name. */
async function list() {
  return (await call(() => native.list())).map(info);
}

/**
 * A warm image: a VM booted from an image, warmed up and saved as a
 * snapshot, which pools restore from. `Image.build` caches by its inputs (the
 * image's digest, the options, the extra files' contents and `warmupTag`), so
 * a rebuild with the same inputs returns at once.
 */
class Image {
  constructor(bundle, key) {
    this.bundle = bundle;
    this.key = key;
  }

  static async build(opts = {}) {
    const { ref, image, name, memoryMib, vcpus, cmd, env, extraFiles, warmup, warmupTag, listenerRequired, guestPort } = opts;
    if (ref !== undefined && image !== undefined) throw invalid('give ref or image, not both');
    if (listenerRequired && !guestPort) throw invalid('listenerRequired needs guestPort');
    if (warmup !== undefined && typeof warmup !== 'function') throw invalid('warmup must be an async function of the VM');
    const files = Object.entries(extraFiles ?? {}).map(([file, spec]) => {
      const plain = typeof spec === 'string' || spec instanceof Uint8Array;
      return { path: file, data: toBuffer(plain ? spec : spec.data, `extra file ${file}`), mode: plain ? 0o644 : (spec.mode ?? 0o644) };
    });
    const argv = typeof cmd === 'string' ? ['/bin/sh', '-c', cmd] : cmd;
    const spec = {
      image: ref ?? image, cpus: vcpus, memoryMib, cmd: argv, env, extraFiles: files, warmupTag,
      guestPort: listenerRequired ? guestPort : undefined,
    };
    const slot = await call(() => native.warmImageSlot(spec));
    if (!slot.ready) {
      const vm = await boot({ image: spec.image, name, cpus: vcpus, memoryMib, cmd: argv, env, ephemeral: true });
      try {
        for (const f of files) await vm.writeFile(f.path, f.data, { mode: f.mode });
        if (warmup) await warmup(vm);
        if (listenerRequired) await call(() => native.waitForListener(vm.name, guestPort, 120000));
        fs.mkdirSync(path.dirname(slot.bundle), { recursive: true });
        const partial = `${slot.bundle}.${process.pid}.partial`;
        try {
          // Raw memory: pooled VMs share the pages they have not written.
          await vm.snapshot({ out: partial, rawMemory: true });
          fs.renameSync(partial, slot.bundle);
        } finally {
          fs.rmSync(partial, { force: true });
        }
      } finally {
        await vm.remove().catch(() => {});
      }
    }
    return new Image(slot.bundle, slot.key);
  }

  /** A warm image from any snapshot bundle (which must stay in place). */
  static async fromSnapshot(bundle) {
    if (typeof bundle !== 'string') throw invalid('fromSnapshot needs the path of a bundle');
    return new Image(path.resolve(bundle), null);
  }

  /** A pool of VMs restored from this image. */
  pool({ min, max, acquireTimeoutMs, idleTimeoutMs, restoreOnRelease } = {}) {
    return new Pool(this, { min, max, acquireTimeoutMs, idleTimeoutMs, restoreOnRelease });
  }
}

/**
 * VMs restored from one warm image: `acquire()` pops a warm one (or restores
 * one while fewer than `max` are alive, else waits up to `acquireTimeoutMs`
 * and fails with POOL_EXHAUSTED); `vm.release()` gives it back, replaced by a
 * fresh restore with `restoreOnRelease` so no state passes between users.
 */
class Pool {
  constructor(image, opts) {
    this.image = image;
    this._native = (() => {
      try {
        return native.createPool(image.bundle, opts);
      } catch (e) {
        throw toFerryError(e);
      }
    })();
  }

  async acquire() {
    const handle = await call(() => this._native.acquire());
    const vm = new Vm(handle.vm());
    let released = false;
    vm.release = async () => {
      if (released) return;
      released = true;
      await call(() => handle.release());
    };
    return vm;
  }

  /** { alive, inUse, idle, waiting, min, max } */
  stats() {
    return this._native.stats();
  }

  async shutdown() {
    await call(() => this._native.shutdown());
  }
}

/**
 * Pulls an OCI or Docker image (`[REGISTRY/]REPOSITORY[:TAG|@sha256:DIGEST]`)
 * into ferry's image cache; `boot({ image: reference })` then uses it.
 * Loopback registries speak plain HTTP, others only when listed in
 * `insecureRegistries`; credentials come from `~/.docker/config.json`.
 */
async function pullImage(reference, { insecureRegistries } = {}) {
  return call(() => native.pullImage(reference, insecureRegistries ?? null));
}

/** Every pulled image, oldest first. */
async function images() {
  return call(() => native.images());
}

/** Removes a pulled image, by reference, digest or id. */
async function removeImage(name) {
  return call(() => native.removeImage(name));
}

/**
 * Pushes the bundle file `bundle` to an S3 store (`s3://BUCKET/PREFIX`):
 * only the chunks the store lacks are uploaded. Resolves to the report; its
 * `url` names the pushed VM.
 */
async function pushBundle(bundle, store, { onProgress } = {}) {
  if (typeof bundle !== 'string') throw invalid('pushBundle needs the path of a bundle file');
  if (typeof store !== 'string') throw invalid('pushBundle needs the store, s3://BUCKET/PREFIX');
  const progress = tracked(onProgress);
  const report = await call(() => native.pushBundle(bundle, store, progress.cb));
  await progress.settled();
  return report;
}

/**
 * Fetches the VM pushed as `url` (`s3://BUCKET/PREFIX/DIGEST`) into the
 * bundle file `dest`, written whole or not at all; every chunk is checked
 * against its hash.
 */
async function pullBundle(url, dest, { onProgress } = {}) {
  if (typeof url !== 'string') throw invalid('pullBundle needs the address of a pushed VM, s3://BUCKET/PREFIX/DIGEST');
  if (typeof dest !== 'string') throw invalid('pullBundle needs the path of the bundle file to write');
  const progress = tracked(onProgress);
  const report = await call(() => native.pullBundle(url, dest, progress.cb));
  await progress.settled();
  return { ...report, path: dest };
}

/** Every stable error code: { code, meaning, action }. */
function errorCodes() {
  return native.errorCodes().map(([code, meaning, action]) => ({ code, meaning, action }));
}

module.exports = {
  boot, provision, restore, attach, list, listenForMigration, pullImage, images, removeImage, errorCodes, FerryError, Vm, Child,
  Image, Pool, pushBundle, pullBundle,
};
