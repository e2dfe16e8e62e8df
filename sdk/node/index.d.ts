// Type declarations of @ferry/runtime.
import type { Readable, Writable } from 'node:stream';
import type { EventEmitter } from 'node:events';

/** A host port forwarded into the guest: "HOST:GUEST", "HOST_IP:HOST:GUEST", or an object. */
export type PortSpec = string | number | { host: number; guest?: number; hostIp?: string };

/** A host directory in the guest: "HOST:GUEST" or an object. */
export type MountSpec = string | { host: string; guest: string };

/** An event of long work (provision, snapshot, restore, push, pull). */
export interface ProgressEvent {
  step: 'provision' | 'snapshot' | 'restore' | 'push' | 'pull';
  kind: 'started' | 'phase' | 'output' | 'bytes' | 'note' | 'finished';
  text?: string | null;
  /** Bytes done so far ("bytes"). */
  bytes?: number | null;
  /** Seconds the work took ("finished"). */
  seconds?: number | null;
}

export type OnProgress = (event: ProgressEvent) => void;

export interface BootOptions {
  /** A rootfs tarball or ext4 image; the base Debian image when absent. */
  image?: string;
  name?: string;
  cpus?: number;
  memoryMib?: number;
  ports?: PortSpec[];
  /** Host directories copied in at boot. */
  mounts?: MountSpec[];
  /** Host directories shared live. */
  liveMounts?: MountSpec[];
  /** Outbound networking for the guest. */
  net?: boolean;
  /** Environment of the main command. */
  env?: Record<string, string>;
  /** Working directory of the main command. */
  workdir?: string;
  /** The main command (a string runs with sh -c); the image's when absent. */
  cmd?: string | string[];
  /** Boot the kernel even where a boot template matches. */
  cold?: boolean;
}

export interface ProvisionOptions {
  /** The image to start from; the base image when absent. */
  image?: string;
  /** Prepares the live VM (install packages, write files). */
  install?: (vm: Vm) => Promise<void> | void;
  /** The image's main command. */
  cmd?: string | string[];
  env?: Record<string, string>;
  workdir?: string;
  /** The rootfs tarball to write (.tar, .tar.gz, .tar.zst). */
  out: string;
  cpus?: number;
  memoryMib?: number;
  onProgress?: OnProgress;
}

export interface RestoreOptions {
  /**
   * A bundle file, a VM pushed to a store (`s3://BUCKET/PREFIX/DIGEST`, as
   * `vm.push` reports it), or a Readable carrying a bundle (from another host).
   */
  bundle?: string | Readable | AsyncIterable<Uint8Array>;
  /** A directory written by `vm.snapshot({ outDir })`. */
  snapDir?: string;
  /** New name; the frozen VM's when absent. */
  name?: string;
  /** Host port forwards, replacing the recorded ones. */
  ports?: PortSpec[];
  /** Accepted for the shape of other runtimes: VMs always run in their own process. */
  detach?: boolean;
  /** Confirms the bundle's networking. */
  net?: boolean;
  /** Confirms the bundle's live mounts of these host directories. */
  liveMounts?: string[];
  /** Grants whatever the bundle asks for: only for bundles you trust. */
  trustBundleConfig?: boolean;
  /** Where else to look for an incremental bundle's parents (beside it first). */
  parents?: string[];
  onProgress?: OnProgress;
}

export interface VmInfo {
  name: string;
  status: 'running' | 'stopped';
  /** Why it stopped, when known. */
  reason: string | null;
  cpus: number;
  memoryMib: number;
  /** "HOST_IP:HOST:GUEST" of each forward. */
  ports: string[];
  image: string;
}

/** A file to write before a command: its bytes, or its bytes and permission bits. */
export type StagedFile = Buffer | Uint8Array | string | { data: Buffer | Uint8Array | string; mode?: number };

export interface ExecOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** Guest user: name, uid, name:group or uid:gid. */
  user?: string | number;
  /** Bytes written to stdin, which is then closed. */
  stdin?: Buffer | Uint8Array | string;
  /** Kill the command after this long. */
  timeoutMs?: number;
  /** Guest files written before the command runs. */
  stageFiles?: Record<string, StagedFile>;
  /**
   * Run next, only if the command exits 0 (and each next one only if the one
   * before did): a command (string for `sh -c`, or argv) or a list of argv
   * arrays. With `stageFiles`, files, command and chain go to the guest in
   * one request; the result holds every output and the last status.
   */
  chain?: string | string[] | string[][];
}

export interface ExecResult {
  stdout: Buffer;
  stderr: Buffer;
  /** Its exit code, or null when a signal ended it. */
  exitCode: number | null;
  /** The signal that ended it, if one did. */
  signal: number | null;
  timedOut: boolean;
}

export interface SpawnOptions {
  env?: Record<string, string>;
  cwd?: string;
  user?: string | number;
  timeoutMs?: number;
  /** Run on a pseudo-terminal of cols x rows (80 x 24). */
  tty?: boolean;
  cols?: number;
  rows?: number;
}

export interface ExitInfo {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
}

/** A running command. Read stdout (or call wait(), which discards it): unread output holds the command back. */
export declare class Child extends EventEmitter {
  readonly pid: number;
  readonly stdin: Writable;
  /** Its stdout (or the pty's output). */
  readonly stdout: Readable;
  readonly stderr: Readable;
  signal(sig: number | NodeJS.Signals): Promise<void>;
  resize(cols: number, rows: number): Promise<void>;
  wait(): Promise<ExitInfo>;
}

export interface SnapshotOptions {
  /** The bundle file to write. */
  out?: string;
  /** A directory to write the bundle into (for `restore({ snapDir })`). */
  outDir?: string;
  /** Keep the VM running; by default it is handed off into the bundle. */
  leaveRunning?: boolean;
  /** Leave out the disk image the VM booted from. */
  thin?: boolean;
  /** Store guest memory uncompressed (bigger; restored without decoding). */
  rawMemory?: boolean;
  /**
   * Compress the pages the guest touched last too (the smallest bundle; the
   * restore decodes them before the guest runs instead of mapping them).
   */
  compact?: boolean;
  /**
   * Write an incremental bundle: only what changed since this earlier
   * snapshot (a bundle file or snapshot directory) of the same running VM,
   * taken with `leaveRunning`.
   */
  since?: string;
  onProgress?: OnProgress;
}

export interface SnapshotReport {
  bytes: number;
  memoryBytes: number;
  memoryStoredBytes: number;
  /** Pages the guest touched just before the snapshot (restored first). */
  prefetchPages: number;
  thin: boolean;
  pausedMs: number;
}

export interface PushOptions {
  /** Stop the VM once it is pushed; by default it keeps running. */
  stop?: boolean;
  onProgress?: OnProgress;
}

/** What a push to a store did. */
export interface PushReport {
  /** Where the VM is now, `s3://BUCKET/PREFIX/DIGEST`: restore it from there. */
  url: string;
  /** The manifest's digest. */
  digest: string;
  /** Chunks the VM is made of (distinct). */
  chunks: number;
  /** Of those, the ones the store lacked and got. */
  uploadedChunks: number;
  /** Bytes sent for them (compressed), plus the manifest. */
  uploadedBytes: number;
  /** Bytes all its chunks take in the store (compressed). */
  storedBytes: number;
  /** Guest memory chunks (not all zero). */
  memoryChunks: number;
}

/** What a pull from a store did. */
export interface PullReport {
  /** Chunks fetched. */
  chunks: number;
  /** Bytes fetched (compressed), the manifest included. */
  fetchedBytes: number;
  /** Size of the bundle written. */
  bundleBytes: number;
  /** The bundle file written. */
  path: string;
}

export interface ForkOptions {
  name?: string;
  names?: string[];
  count?: number;
  /** The sibling's forwards; with count or names, one array per sibling. */
  ports?: PortSpec[] | PortSpec[][];
}

export interface Stats {
  vmmRssBytes: number;
  vmmPssBytes: number;
  guestResidentBytes: number;
  overheadBytes: number;
  lazyPendingBytes: number | null;
}

export interface Exposed {
  /** "HOST_IP:PORT" the forward listens on. */
  readonly localAddr: string;
  stop(): Promise<void>;
}

/** A VM on this host. It lives in its own process and outlives this one. */
export declare class Vm {
  readonly name: string;
  exec(cmd: string | string[], opts?: ExecOptions): Promise<ExecResult>;
  spawn(argv: string | string[], opts?: SpawnOptions): Promise<Child>;
  writeFile(path: string, data: Buffer | Uint8Array | string, opts?: { mode?: number }): Promise<void>;
  readFile(path: string): Promise<Buffer>;
  snapshot(opts: SnapshotOptions): Promise<SnapshotReport & { path: string }>;
  /**
   * Moves the running VM live to another host; resolves once it runs there
   * (this VM is then gone). On failure the VM runs on here.
   */
  migrate(dest: string, opts?: MigrateOptions): Promise<MigrateReport>;
  /**
   * Pushes the VM to an S3 store (`s3://BUCKET/PREFIX`): only the chunks the
   * store lacks are uploaded. The VM keeps running unless `stop`.
   */
  push(store: string, opts?: PushOptions): Promise<PushReport>;
  /** The bundle as a stream; emits "report" before its end. */
  snapshotStream(opts?: Omit<SnapshotOptions, 'out' | 'outDir'>): Readable;
  fork(opts?: ForkOptions & { count?: undefined; names?: undefined }): Promise<Vm>;
  fork(opts: ForkOptions & ({ count: number } | { names: string[] })): Promise<Vm[]>;
  pause(): Promise<void>;
  resume(): Promise<void>;
  stop(opts?: { timeoutMs?: number }): Promise<void>;
  remove(): Promise<void>;
  exposeTcp(hostPort: number, guestPort?: number, opts?: { hostIp?: string }): Promise<Exposed>;
  workloadSignal(sig: number | NodeJS.Signals): Promise<void>;
  stats(): Promise<Stats>;
  info(): Promise<VmInfo>;
  /** Stops and removes the VM. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** Every failure: `code` is one of ferry's stable codes (docs/errors.md). */
export declare class FerryError extends Error {
  readonly code: string;
  readonly hint: string | null;
  /** Whether the same call may succeed if tried again later. */
  readonly retryable: boolean;
}

export declare function boot(opts?: BootOptions): Promise<Vm>;
export declare function provision(opts: ProvisionOptions): Promise<{ out: string }>;
export declare function restore(opts: RestoreOptions): Promise<Vm>;
export declare function attach(name: string): Promise<Vm>;
/** Listens for a VM migrating here (port 0: any free port). */
export declare function listenForMigration(opts?: { listen?: string }): Promise<Receiver>;

export interface MigrateOptions {
  /** The receiver's one-time token (required over TCP). */
  token?: string;
  /** The pause the VM may see, in milliseconds (default 300). */
  downtimeMs?: number;
  /** Bytes per second at most on the link. */
  bandwidthLimit?: number;
  /** A shell command whose stdin and stdout reach `ferry receive --stdio`; dest is then ignored. */
  via?: string;
}

export interface MigrateReport {
  destination: string;
  total_ms: number;
  downtime_ms: number;
  estimated_final_ms: number;
  destination_restore_ms: number;
  rounds: { pages: number; bytes: number; ms: number }[];
  final_pages: number;
  final_bytes: number;
  disk_bytes: number;
  disk_base_bytes: number;
  bytes: number;
}

export interface Receiver {
  /** The token the source must give. */
  readonly token: string;
  /** HOST:PORT it listens on. */
  readonly address: string;
  /** Resolves to the VM once it runs here. */
  receive(opts?: { name?: string; ports?: PortSpec[]; net?: boolean; liveMounts?: string[]; trustBundleConfig?: boolean }): Promise<Vm>;
}
export declare function list(): Promise<VmInfo[]>;

/** Pushes a bundle file to an S3 store (`s3://BUCKET/PREFIX`). */
export declare function pushBundle(
  bundle: string,
  store: string,
  opts?: { onProgress?: OnProgress },
): Promise<PushReport>;
/** Fetches a pushed VM (`s3://BUCKET/PREFIX/DIGEST`) into a bundle file. */
export declare function pullBundle(
  url: string,
  dest: string,
  opts?: { onProgress?: OnProgress },
): Promise<PullReport>;

/** A pulled OCI/Docker image. */
export interface ImageInfo {
  /** References that were pulled to it. */
  references: string[];
  /** Manifest digest (`sha256:...`). */
  digest: string;
  /** First 12 hex digits of the digest. */
  id: string;
  /** Bytes of its layers as pulled (compressed). */
  size: number;
  /** When it was first pulled (seconds since the epoch). */
  created: number;
  /** Entrypoint followed by Cmd. */
  command: string[];
  /** `NAME=value` entries. */
  env: string[];
  workdir?: string | null;
  user?: string | null;
}

/** Pulls an image into ferry's cache; `boot({ image: reference })` then uses it. */
export declare function pullImage(
  reference: string,
  opts?: { insecureRegistries?: string[] },
): Promise<ImageInfo>;
/** Every pulled image, oldest first. */
export declare function images(): Promise<ImageInfo[]>;
/** Removes a pulled image, by reference, digest or id. */
export declare function removeImage(name: string): Promise<ImageInfo>;
export declare function errorCodes(): { code: string; meaning: string; action: string }[];

/** Options of `Image.build`; every one is part of the cache key. */
export interface ImageBuildOptions {
  /** An OCI/Docker reference (pulled if need be). */
  ref?: string;
  /** A rootfs tarball, an ext4 image or a reference; the base image when both are absent. */
  image?: string;
  /** Name of the VM the build boots. */
  name?: string;
  memoryMib?: number;
  vcpus?: number;
  /** Main command (a string runs with `sh -c`); the image's own when absent. */
  cmd?: string | string[];
  env?: Record<string, string>;
  /** Files written before the warmup: path → contents, or { data, mode }. */
  extraFiles?: Record<string, string | Uint8Array | { data: string | Uint8Array; mode?: number }>;
  /** Runs once in the booted VM before it is saved. */
  warmup?: (vm: Vm) => Promise<void>;
  /** Change it when the warmup changes. */
  warmupTag?: string;
  /** Wait until something listens on `guestPort` before saving. */
  listenerRequired?: boolean;
  guestPort?: number;
}

export interface PoolOptions {
  /** Idle VMs kept warm (default 1). */
  min?: number;
  /** Most VMs alive at once (default 4). */
  max?: number;
  /** How long acquire() waits when max are in use (default 30000), then POOL_EXHAUSTED. */
  acquireTimeoutMs?: number;
  /** Idle VMs beyond min go after this long unused (default 300000). */
  idleTimeoutMs?: number;
  /** A released VM is replaced by a fresh restore (default true). */
  restoreOnRelease?: boolean;
}

export interface PoolStats {
  alive: number;
  inUse: number;
  idle: number;
  waiting: number;
  min: number;
  max: number;
}

/** A VM handed out by a pool. */
export interface PooledVm extends Vm {
  /** Gives it back to its pool. */
  release(): Promise<void>;
}

/** A warm image: a booted, warmed-up VM saved as a snapshot. */
export declare class Image {
  readonly bundle: string;
  readonly key: string | null;
  static build(opts?: ImageBuildOptions): Promise<Image>;
  static fromSnapshot(bundle: string): Promise<Image>;
  pool(opts?: PoolOptions): Pool;
}

/** VMs restored from a warm image. */
export declare class Pool {
  readonly image: Image;
  acquire(): Promise<PooledVm>;
  stats(): PoolStats;
  shutdown(): Promise<void>;
}
