"""The blocking API: every call returns when its work is done and releases
the GIL while it waits, so other Python threads keep running."""

from __future__ import annotations

import builtins
import io
import os
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

from . import _args, _native
from ._args import Command, Data, MountLike, PortLike, SignalLike
from ._errors import FerryError, invalid

ExecResult = _native.ExecResult
Exit = _native.Exit
Stats = _native.Stats
SnapshotReport = _native.SnapshotReport
PushReport = _native.PushReport
PullReport = _native.PullReport
VmInfo = _native.VmInfo
ImageInfo = _native.ImageInfo
PoolStats = _native.PoolStats

PathLike = Union[str, "os.PathLike[str]"]


class _Output(io.RawIOBase):
    """One output stream of a spawned command, read as it arrives."""

    def __init__(self, child: _native.Child, stream: int) -> None:
        super().__init__()
        self._child = child
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        got = self._child.read(self._stream, len(view))
        view[: len(got)] = got
        return len(got)

    def readall(self) -> bytes:
        return self._child.read(self._stream, -1)


class _Input(io.RawIOBase):
    """A spawned command's stdin; closing it sends end of file."""

    def __init__(self, child: _native.Child) -> None:
        super().__init__()
        self._child = child

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed stdin")
        data = bytes(b) if not isinstance(b, bytes) else b
        self._child.write(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._child.close_stdin()
            finally:
                super().close()


class Child:
    """A running command in a VM (from :meth:`Vm.spawn`).

    ``stdin`` is a writable binary file (closing it sends end of file);
    ``stdout`` and ``stderr`` are readable binary files that give the output
    as it comes. Each stream buffers up to 8 MiB unread before the command
    is held back, as a pipe would; :meth:`wait` lifts that bound. Once no
    reference to a child that still runs is left, the command is ended.
    """

    def __init__(self, native: _native.Child) -> None:
        self._native = native
        self.pid: int = native.pid
        self.stdin = _Input(native)
        self.stdout = io.BufferedReader(_Output(native, 1), 1 << 16)
        self.stderr = io.BufferedReader(_Output(native, 2), 1 << 16)
        self._exit: Optional[Exit] = None

    def signal(self, sig: SignalLike) -> None:
        """Sends it a signal (a number, ``"SIGTERM"`` or ``signal.SIGTERM``)."""
        self._native.signal(_args.signal_number(sig))

    def terminate(self) -> None:
        """Sends it SIGTERM."""
        self.signal(15)

    def kill(self) -> None:
        """Sends it SIGKILL."""
        self.signal(9)

    def resize(self, cols: int, rows: int) -> None:
        """Resizes its pty (spawned with ``tty=True``)."""
        self._native.resize(_args.count(rows, "rows", 1, 65535), _args.count(cols, "cols", 1, 65535))

    def wait(self, timeout: Optional[float] = None) -> Exit:
        """Waits for it to end; output not read yet stays readable. Raises
        TimeoutError after ``timeout`` seconds."""
        if self._exit is None:
            got = self._native.wait(_args.seconds(timeout, "timeout"))
            if got is None:
                raise TimeoutError(f"the command (pid {self.pid}) still runs after {timeout} s")
            self._exit = got
        return self._exit

    def poll(self) -> Optional[Exit]:
        """How it ended, or None while it runs."""
        if self._exit is None:
            self._exit = self._native.poll()
        return self._exit

    @property
    def returncode(self) -> Optional[int]:
        """Its exit code; minus the signal that ended it; None while it runs."""
        e = self.poll()
        if e is None:
            return None
        return e.exit_code if e.exit_code is not None else -(e.signal or 0)

    def communicate(self, input: Optional[Data] = None, timeout: Optional[float] = None):
        """Writes ``input``, closes stdin, and returns ``(stdout, stderr)``
        once it ends."""
        if input is not None:
            self.stdin.write(_args.data(input, "input"))
        if not self.stdin.closed:
            self.stdin.close()
        self.wait(timeout)
        return self.stdout.read(), self.stderr.read()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.poll() is None:
            try:
                self.kill()
                self.wait(10)
            except (FerryError, TimeoutError):
                pass

    def __repr__(self) -> str:
        return f"Child(pid={self.pid}, exit={self._exit!r})"


class Port:
    """A port forward added at run time (:meth:`Vm.expose_tcp`)."""

    def __init__(self, native: _native.Port) -> None:
        self._native = native
        self.local_addr: str = native.local_addr

    def close(self) -> None:
        """Stops forwarding and frees the host port."""
        self._native.close()

    def __enter__(self) -> "Port":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Port(local_addr={self.local_addr!r})"


class Vm:
    """A VM on this host. VMs live in their own processes: they outlive this
    one unless removed. ``with`` stops and removes the VM on exit, also
    when the block raises."""

    def __init__(self, native: _native.Vm) -> None:
        self._native = native
        self.name: str = native.name

    def exec(
        self,
        cmd: Command,
        env: Optional[Mapping[str, Any]] = None,
        cwd: Optional[str] = None,
        user: Optional[Union[str, int]] = None,
        stdin: Optional[Data] = None,
        timeout: Optional[float] = None,
        stage_files: Optional[Mapping[str, Any]] = None,
    ) -> ExecResult:
        """Runs a command to its end and returns its output and status. A
        command that exits non-zero is a result, not an exception.

        ``stage_files`` (guest path -> data or ``(data, mode)``) are written
        first, in the same round trip when small."""
        argv = _args.argv(cmd)
        args = _args.exec_args(env, cwd, user, timeout)
        if stage_files is not None:
            if stdin is not None:
                raise invalid("stdin does not go with stage_files")
            return self._native.exec_batch(_args.staged(stage_files), [argv], args)
        data = None if stdin is None else _args.data(stdin, "stdin")
        return self._native.exec(argv, args, data)

    def spawn(
        self,
        cmd: Command,
        env: Optional[Mapping[str, Any]] = None,
        cwd: Optional[str] = None,
        user: Optional[Union[str, int]] = None,
        timeout: Optional[float] = None,
        tty: bool = False,
        cols: int = 80,
        rows: int = 24,
    ) -> Child:
        """Starts a command and returns at once with its streams."""
        size = (_args.count(rows, "rows", 1, 65535), _args.count(cols, "cols", 1, 65535)) if tty else None
        args = _args.exec_args(env, cwd, user, timeout, size)
        return Child(self._native.spawn(_args.argv(cmd), args))

    def write_file(self, path: str, data: Data, mode: int = 0o644) -> None:
        """Writes a guest file, making its parent directories."""
        self._native.write_file(str(path), _args.data(data, "data"), _args.count(mode, "mode", 0, 0o7777))

    def read_file(self, path: str) -> bytes:
        """Reads a guest file."""
        contents, _mode = self._native.read_file(str(path))
        return contents

    def snapshot(
        self,
        out: Union[PathLike, Any],
        leave_running: bool = False,
        thin: bool = False,
        raw_memory: bool = False,
        since: Optional[PathLike] = None,
    ) -> SnapshotReport:
        """Freezes the VM into a bundle: a file path, or a binary file object
        (with ``write``) or socket (``sendall``) it is streamed to. Unless
        ``leave_running``, the VM is handed off: it stops and lives on in the
        bundle. If a stream fails before the end, the VM runs on. With
        ``since`` (an earlier bundle of this running VM, taken with
        ``leave_running``), only what changed since it is written."""
        parent = None if since is None else os.fspath(since)
        if isinstance(out, (str, os.PathLike)):
            return self._native.snapshot_path(
                os.fspath(out), leave_running, thin, raw_memory, parent
            )
        return self._native.snapshot_writer(out, leave_running, thin, raw_memory, parent)

    def fork(
        self,
        name: Optional[str] = None,
        count: Optional[int] = None,
        ports: Optional[Sequence[Any]] = None,
        names: Optional[Sequence[str]] = None,
    ):
        """Forks the VM into a sibling (a :class:`Vm`), or into ``count``
        siblings or ``names`` (a list; ``ports`` then has one list per
        sibling). The source is paused once for all of them."""
        many = count is not None or names is not None
        if name is not None and names is not None:
            raise invalid("give name or names, not both")
        wanted = builtins.list(names) if names is not None else ([name] if name else [])
        if ports is None:
            port_lists: List[List[str]] = []
        elif many:
            port_lists = [_args.port_specs(p) for p in ports]
        else:
            port_lists = [_args.port_specs(ports)]
        made = self._native.fork(wanted, count, port_lists)
        vms = [Vm(n) for n in made]
        return vms if many else vms[0]

    def migrate(
        self,
        dest: Optional[str] = None,
        token: Optional[str] = None,
        downtime_ms: Optional[int] = None,
        bandwidth_limit: Optional[int] = None,
        via: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Moves the running VM live to another host: ``dest`` is the
        ``HOST:PORT`` of a receiver (:func:`listen_for_migration` or ``ferry
        receive --listen``) with its ``token``; or ``via``, a shell command
        whose stdin and stdout reach ``ferry receive --stdio``. Returns the
        report once the VM runs there (this VM is then gone); on failure the
        VM runs on here."""
        import json

        text = self._native.migrate(
            "-" if dest is None else str(dest), token, downtime_ms, bandwidth_limit, via
        )
        return json.loads(text)

    def push(self, store: str, stop: bool = False) -> PushReport:
        """Pushes the VM to an S3 store (``s3://BUCKET/PREFIX``) as
        content-addressed chunks, of which only those the store lacks are
        uploaded. The VM keeps running unless ``stop``. The report's ``url``
        restores it on any host (:func:`restore`). Credentials come from the
        AWS environment variables or ``~/.aws``."""
        return self._native.push(_store(store, "push"), bool(stop))

    def pause(self) -> None:
        """Stops its vCPUs; memory, devices and forwards stay."""
        self._native.pause()

    def resume(self) -> None:
        """Lets a paused VM run again."""
        self._native.resume()

    def stop(self, timeout: float = 10) -> None:
        """Asks the guest to power off and ends it after ``timeout`` seconds;
        returns once it is gone (its ports are free)."""
        t = _args.seconds(timeout, "timeout")
        self._native.stop(10.0 if t is None else t)

    def kill(self) -> None:
        """Ends the VM at once, without asking the guest."""
        self._native.kill()

    def remove(self) -> None:
        """Ends the VM if it runs and deletes its state."""
        self._native.remove()

    def expose_tcp(
        self, host_port: int, guest_port: Optional[int] = None, host_ip: Optional[str] = None
    ) -> Port:
        """Forwards host TCP ``host_port`` (on 127.0.0.1 unless ``host_ip``)
        to ``guest_port`` from now on; the returned :class:`Port` closes it."""
        guest = host_port if guest_port is None else guest_port
        spec = (
            _args.port_spec((host_ip, host_port, guest))
            if host_ip
            else _args.port_spec((host_port, guest))
        )
        return Port(self._native.expose_tcp(spec))

    def workload_signal(self, sig: SignalLike) -> None:
        """Sends a signal to the VM's main command."""
        self._native.workload_signal(_args.signal_number(sig))

    def stats(self) -> Stats:
        """Memory use of the VM."""
        return self._native.stats()

    def info(self) -> VmInfo:
        """What :func:`list` shows of it."""
        return self._native.info()

    def status(self) -> str:
        """``"running"`` or ``"stopped"``."""
        return self._native.status()

    def logs(self) -> bytes:
        """The guest's serial console so far."""
        return self._native.logs()

    def _dispose(self) -> None:
        try:
            self.stop(2)
        except FerryError:
            pass  # not running: removing is all there is to do
        self.remove()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._dispose()

    def __repr__(self) -> str:
        return f"Vm(name={self.name!r})"


def boot(
    image: Optional[str] = None,
    name: Optional[str] = None,
    cpus: int = 1,
    memory_mib: int = 512,
    ports: Iterable[PortLike] = (),
    mounts: Iterable[MountLike] = (),
    live_mounts: Iterable[MountLike] = (),
    net: bool = False,
    env: Optional[Mapping[str, Any]] = None,
    cmd: Optional[Command] = None,
    workdir: Optional[str] = None,
    cold: bool = False,
    ephemeral: bool = False,
    run_image_command: bool = True,
) -> Vm:
    """Boots a VM and returns once its guest agent answers.

    ``image`` is a rootfs tarball, an ext4 image or an OCI reference
    (pulled when not cached); the base Debian image when None. ``cmd`` is the
    main command (the VM ends when it does); without one, an OCI image's
    own command runs (unless ``run_image_command`` is False), and otherwise
    the VM idles. ``ephemeral`` VMs are removed once they stop or this
    process ends. ``mounts`` are host
    directories copied in at boot, ``live_mounts`` are shared live."""
    native = _native.boot(
        None if image is None else os.fspath(image),
        name,
        _args.count(cpus, "cpus"),
        _args.count(memory_mib, "memory_mib"),
        _args.port_specs(ports),
        _args.mount_specs(mounts),
        _args.mount_specs(live_mounts),
        bool(net),
        _args.env_dict(env),
        workdir,
        None if cmd is None else _args.argv(cmd),
        bool(cold),
        bool(ephemeral),
        bool(run_image_command),
    )
    return Vm(native)


def restore(
    bundle: Union[PathLike, Any],
    name: Optional[str] = None,
    ports: Optional[Iterable[PortLike]] = None,
    net: bool = False,
    live_mounts: Iterable[str] = (),
    trust_bundle_config: bool = False,
) -> Vm:
    """Thaws a bundle into a running VM: a file path (memory is mapped from
    it, so it must stay in place), a VM pushed to a store
    (``"s3://BUCKET/PREFIX/DIGEST"``, as :meth:`Vm.push` reports it; fetched
    into ferry's data directory first), or a binary file object or socket it
    is read from (received there first). ``ports`` replace the recorded
    forwards when given."""
    port_list = None if ports is None else _args.port_specs(ports)
    live = [os.fspath(m) for m in live_mounts]
    if isinstance(bundle, os.PathLike) and os.fspath(bundle).startswith("s3:/"):
        raise invalid(f"a store address is a str, not {bundle!r} (a path folds s3:// into s3:/)")
    if isinstance(bundle, (str, os.PathLike)):
        native = _native.restore_path(
            os.fspath(bundle), name, port_list, bool(net), live, bool(trust_bundle_config)
        )
    else:
        native = _native.restore_reader(
            bundle, name, port_list, bool(net), live, bool(trust_bundle_config)
        )
    return Vm(native)


class Receiver:
    """A listener for one VM migrating here (:func:`listen_for_migration`)."""

    def __init__(self, native: Any) -> None:
        self._native = native

    @property
    def token(self) -> str:
        """The one-time token the source must give."""
        return self._native.token

    @property
    def address(self) -> str:
        """``HOST:PORT`` it listens on."""
        return self._native.address

    def receive(
        self,
        name: Optional[str] = None,
        ports: Optional[Iterable[PortLike]] = None,
        net: bool = False,
        live_mounts: Iterable[str] = (),
        trust_bundle_config: bool = False,
    ) -> Vm:
        """Waits for the migration and returns the VM once it runs here;
        connections with a wrong token are refused and the wait goes on."""
        port_list = None if ports is None else _args.port_specs(ports)
        return Vm(
            self._native.receive(
                name, port_list, net, builtins.list(live_mounts), trust_bundle_config
            )
        )


def listen_for_migration(listen: str = "0.0.0.0:0") -> Receiver:
    """Listens on ``listen`` (``HOST:PORT``; port 0 picks one) for a VM
    migrating here, with a fresh one-time token."""
    return Receiver(_native.listen_for_migration(str(listen)))


def attach(name: str) -> Vm:
    """Opens an existing VM by name (running or not)."""
    return Vm(_native.attach(str(name)))


def list() -> List[VmInfo]:  # noqa: A001 - the API's name for it
    """Every VM on this host, sorted by name."""
    return _native.list()


def provision(
    out: PathLike,
    install: Optional[Callable[[Vm], Any]] = None,
    cmd: Optional[Command] = None,
    env: Optional[Mapping[str, Any]] = None,
    workdir: Optional[str] = None,
    image: Optional[str] = None,
    cpus: int = 1,
    memory_mib: int = 512,
) -> str:
    """Bakes an image: boots the base (or ``image``) with networking, lets
    ``install(vm)`` prepare it, sets the main command and writes the rootfs
    tarball ``out``. The VM is removed at the end, also on failure. Returns
    the path written."""
    vm = boot(image=image, cpus=cpus, memory_mib=memory_mib, net=True, ephemeral=True)
    try:
        vm._native.sync_clock()
        if install is not None:
            install(vm)
    except BaseException:
        try:
            vm.remove()
        except FerryError:
            pass
        raise
    return vm._native.bake(
        os.fspath(out),
        None if cmd is None else _args.argv(cmd),
        _args.env_pairs(env),
        workdir,
    )


def pull_image(reference: str, insecure_registries: Iterable[str] = ()) -> ImageInfo:
    """Pulls an OCI or Docker image (``[REGISTRY/]REPOSITORY[:TAG|@DIGEST]``)
    into ferry's image cache; ``boot(image=reference)`` then uses it.
    Loopback registries speak plain HTTP, others only when listed."""
    return _native.pull_image(str(reference), [str(r) for r in insecure_registries])


def images() -> List[ImageInfo]:
    """Every pulled image, oldest first."""
    return _native.images()


def remove_image(name: str) -> ImageInfo:
    """Removes a pulled image, by reference, digest or id."""
    return _native.remove_image(str(name))


def _store(address: Any, call: str) -> str:
    # Only a str: a pathlib.Path would fold "s3://" into "s3:/".
    if not isinstance(address, str):
        raise invalid(f"{call} needs a store address (a str, s3://BUCKET/PREFIX), not {address!r}")
    return address


def push_bundle(bundle: PathLike, store: str) -> PushReport:
    """Pushes the bundle file ``bundle`` to an S3 store
    (``s3://BUCKET/PREFIX``): only the chunks the store lacks are uploaded.
    The report's ``url`` names the pushed VM."""
    return _native.push_bundle(os.fspath(bundle), _store(store, "push_bundle"))


def pull_bundle(url: str, dest: PathLike) -> PullReport:
    """Fetches the VM pushed as ``url`` (``s3://BUCKET/PREFIX/DIGEST``) into
    the bundle file ``dest``, written whole or not at all; every chunk is
    checked against its hash."""
    return _native.pull_bundle(_store(url, "pull_bundle"), os.fspath(dest))


def error_codes() -> List[tuple]:
    """Every stable error code as ``(code, meaning, action)``."""
    return _native.error_codes()


class _WarmSpec:
    """What a warm image is made of, and where it is cached."""

    def __init__(self, ref, image, name, memory_mib, vcpus, cmd, env, extra_files,
                 warmup, warmup_tag, listener_required, guest_port) -> None:
        if ref is not None and image is not None:
            raise invalid("give ref or image, not both")
        if listener_required and not guest_port:
            raise invalid("listener_required needs guest_port")
        if warmup is not None and not callable(warmup):
            raise invalid("warmup must be a function of the VM")
        self.image = ref if ref is not None else image
        self.name = name
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.cmd = None if cmd is None else _args.argv(cmd)
        self.env = _args.env_dict(env) or {}
        self.files = _args.staged(extra_files or {})
        self.warmup = warmup
        self.guest_port = int(guest_port) if listener_required else None

    def slot(self, warmup_tag: Optional[str]):
        return _native.warm_image_slot(
            self.image, self.vcpus, self.memory_mib, self.cmd, self.env,
            self.files, warmup_tag, self.guest_port,
        )

    def boot(self) -> Vm:
        return boot(image=self.image, name=self.name, cpus=self.vcpus or 1,
                    memory_mib=self.memory_mib or 512, cmd=self.cmd, env=self.env,
                    ephemeral=True)


def _save_warm(vm: Vm, bundle: str) -> None:
    """Snapshots a warmed-up VM to ``bundle`` through a temporary name, so a
    half-written bundle never looks built."""
    os.makedirs(os.path.dirname(bundle), exist_ok=True)
    partial = f"{bundle}.{os.getpid()}.partial"
    try:
        # Raw memory: pooled VMs share the pages they have not written.
        vm.snapshot(partial, raw_memory=True)
        os.replace(partial, bundle)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class Image:
    """A warm image: a VM booted from an image, warmed up and saved as a
    snapshot, which pools restore from. :meth:`build` caches by its inputs
    (the image's digest, the options, the extra files' contents and
    ``warmup_tag``), so a rebuild with the same inputs returns at once."""

    def __init__(self, bundle: str, key: Optional[str]) -> None:
        self.bundle = bundle
        self.key = key

    @staticmethod
    def build(
        ref: Optional[str] = None,
        image: Optional[str] = None,
        name: Optional[str] = None,
        memory_mib: Optional[int] = None,
        vcpus: Optional[int] = None,
        cmd: Optional[Command] = None,
        env: Optional[Mapping[str, Any]] = None,
        extra_files: Optional[Mapping[str, Any]] = None,
        warmup: Optional[Callable[[Vm], Any]] = None,
        warmup_tag: Optional[str] = None,
        listener_required: bool = False,
        guest_port: Optional[int] = None,
    ) -> "Image":
        """Builds (or finds cached) the warm image of these inputs."""
        spec = _WarmSpec(ref, image, name, memory_mib, vcpus, cmd, env, extra_files,
                         warmup, warmup_tag, listener_required, guest_port)
        key, bundle, ready = spec.slot(warmup_tag)
        if not ready:
            vm = spec.boot()
            try:
                for path, contents, mode in spec.files:
                    vm.write_file(path, contents, mode)
                if spec.warmup is not None:
                    spec.warmup(vm)
                if spec.guest_port is not None:
                    _native.wait_for_listener(vm.name, spec.guest_port, 120.0)
                _save_warm(vm, bundle)
            finally:
                try:
                    vm.remove()
                except FerryError:
                    pass
        return Image(bundle, key)

    @staticmethod
    def from_snapshot(bundle: PathLike) -> "Image":
        """A warm image from any snapshot bundle (which must stay in place)."""
        return Image(os.path.abspath(os.fspath(bundle)), None)

    def pool(
        self,
        min: Optional[int] = None,
        max: Optional[int] = None,
        acquire_timeout: Optional[float] = None,
        idle_timeout: Optional[float] = None,
        restore_on_release: Optional[bool] = None,
    ) -> "Pool":
        """A pool of VMs restored from this image."""
        return Pool(self, min, max, acquire_timeout, idle_timeout, restore_on_release)

    def __repr__(self) -> str:
        return f"Image(bundle={self.bundle!r}, key={self.key!r})"


class PooledVm(Vm):
    """A VM handed out by a :class:`Pool`; :meth:`release` gives it back
    (also at the end of a ``with`` block)."""

    def __init__(self, handle: _native.PooledVm) -> None:
        super().__init__(handle.vm())
        self._handle = handle

    def release(self) -> None:
        """Gives the VM back to its pool; a second call does nothing."""
        self._handle.release()

    def _dispose(self) -> None:
        self.release()


class Pool:
    """VMs restored from one warm image: :meth:`acquire` pops a warm one (or
    restores one while fewer than ``max`` are alive, else waits up to
    ``acquire_timeout`` seconds and raises PoolExhausted); ``release()``
    gives it back, replaced by a fresh restore with ``restore_on_release``
    so no state passes between users."""

    def __init__(self, image: Image, min=None, max=None, acquire_timeout=None,
                 idle_timeout=None, restore_on_release=None) -> None:
        self.image = image
        self._native = _native.Pool(
            image.bundle, min, max,
            _args.seconds(acquire_timeout, "acquire_timeout"),
            _args.seconds(idle_timeout, "idle_timeout"),
            restore_on_release,
        )

    def acquire(self) -> PooledVm:
        """A VM from the pool."""
        return PooledVm(self._native.acquire())

    def stats(self) -> PoolStats:
        """The pool's counts (never waits)."""
        return self._native.stats()

    def shutdown(self) -> None:
        """Removes idle VMs and stops the pool; VMs in use go when released."""
        self._native.shutdown()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
