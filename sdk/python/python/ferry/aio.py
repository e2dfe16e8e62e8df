"""ferry on asyncio: the same API as :mod:`ferry` with ``async def`` methods
and ``async with``. Each blocking call runs on a thread of ferry's own
executor with the GIL released, so the event loop keeps turning while VMs
boot, run commands and snapshot. Cancelling an awaiting task does not stop
work already handed to the VM."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable, List, Mapping, Optional, Sequence, Union

from . import _args, _machine, _native, _sync
from ._args import Command, Data, MountLike, PortLike, SignalLike
from ._errors import FerryError
from ._machine import MachineConfig, MachineResult, MachineStatus, MountSpec, PortSpec, ResourceSpec
from ._sync import (
    ExecResult,
    Exit,
    ImageInfo,
    PoolStats,
    PullReport,
    PushReport,
    SnapshotReport,
    Stats,
    VmInfo,
)

# list() is left out of __all__: a star import would hide the builtin.
__all__ = [
    "boot", "restore", "attach", "listen_for_migration", "Receiver", "provision",
    "pull_image", "images",
    "remove_image", "Vm", "Child", "Port", "Image", "Pool", "PooledVm", "Machine",
    "MachineConfig", "MachineResult", "MachineStatus", "MountSpec", "PortSpec",
    "ResourceSpec", "ExecResult", "Exit", "Stats", "SnapshotReport", "VmInfo",
    "ImageInfo", "PoolStats", "push_bundle", "pull_bundle", "PushReport", "PullReport",
]

# The builtin, which this module's list() hides.
_list = list

# Threads for blocking calls: many execs in flight at once each hold one
# while they wait on their VM (waiting costs no CPU and no GIL).
_executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="ferry-aio")


async def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, functools.partial(fn, *args, **kwargs))


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _AsyncReader:
    """An output stream of a spawned command, read without blocking the loop."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all until the end when ``n`` < 0); b"" at the end."""
        if n is None or n < 0:
            return await _run(self._stream.read)
        return await _run(self._stream.read1, n)

    async def readline(self) -> bytes:
        """One line, with its newline; b"" at the end."""
        return await _run(self._stream.readline)

    def __aiter__(self) -> "_AsyncReader":
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class _AsyncWriter:
    """A spawned command's stdin."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def write(self, data: Data) -> int:
        """Writes to its stdin."""
        return await _run(self._stream.write, _args.data(data, "data"))

    async def close(self) -> None:
        """Closes its stdin (end of file)."""
        await _run(self._stream.close)

    @property
    def closed(self) -> bool:
        return self._stream.closed


class Child:
    """A running command in a VM (from :meth:`Vm.spawn`), with async streams."""

    def __init__(self, sync: _sync.Child) -> None:
        self._sync = sync
        self.pid = sync.pid
        self.stdin = _AsyncWriter(sync.stdin)
        self.stdout = _AsyncReader(sync.stdout)
        self.stderr = _AsyncReader(sync.stderr)

    async def signal(self, sig: SignalLike) -> None:
        """Sends it a signal."""
        await _run(self._sync.signal, sig)

    async def resize(self, cols: int, rows: int) -> None:
        """Resizes its pty."""
        await _run(self._sync.resize, cols, rows)

    async def wait(self, timeout: Optional[float] = None) -> Exit:
        """Waits for it to end; output not read yet stays readable."""
        return await _run(self._sync.wait, timeout)

    def poll(self) -> Optional[Exit]:
        """How it ended, or None while it runs (never waits)."""
        return self._sync.poll()

    @property
    def returncode(self) -> Optional[int]:
        return self._sync.returncode

    async def communicate(self, input: Optional[Data] = None, timeout: Optional[float] = None):
        """Writes ``input``, closes stdin, returns ``(stdout, stderr)`` at the end."""
        return await _run(self._sync.communicate, input, timeout)

    async def __aenter__(self) -> "Child":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await _run(self._sync.__exit__, *exc)


class Port:
    """A port forward added at run time."""

    def __init__(self, sync: _sync.Port) -> None:
        self._sync = sync
        self.local_addr = sync.local_addr

    async def close(self) -> None:
        """Stops forwarding and frees the host port."""
        await _run(self._sync.close)

    async def __aenter__(self) -> "Port":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class Vm:
    """A VM on this host; ``async with`` stops and removes it on exit, also
    when the block raises. See :class:`ferry.Vm` for each method."""

    def __init__(self, sync: _sync.Vm) -> None:
        self._sync = sync
        self.name = sync.name

    async def exec(self, cmd: Command, env: Optional[Mapping[str, Any]] = None,
                   cwd: Optional[str] = None, user: Optional[Union[str, int]] = None,
                   stdin: Optional[Data] = None, timeout: Optional[float] = None,
                   stage_files: Optional[Mapping[str, Any]] = None) -> ExecResult:
        """Runs a command to its end."""
        return await _run(self._sync.exec, cmd, env, cwd, user, stdin, timeout, stage_files)

    async def spawn(self, cmd: Command, env: Optional[Mapping[str, Any]] = None,
                    cwd: Optional[str] = None, user: Optional[Union[str, int]] = None,
                    timeout: Optional[float] = None, tty: bool = False,
                    cols: int = 80, rows: int = 24) -> Child:
        """Starts a command and returns with its streams."""
        return Child(await _run(self._sync.spawn, cmd, env, cwd, user, timeout, tty, cols, rows))

    async def write_file(self, path: str, data: Data, mode: int = 0o644) -> None:
        """Writes a guest file, making its parent directories."""
        await _run(self._sync.write_file, path, data, mode)

    async def read_file(self, path: str) -> bytes:
        """Reads a guest file."""
        return await _run(self._sync.read_file, path)

    async def snapshot(self, out: Any, leave_running: bool = False, thin: bool = False,
                       raw_memory: bool = False) -> SnapshotReport:
        """Freezes the VM into a bundle file or a binary file object."""
        return await _run(self._sync.snapshot, out, leave_running, thin, raw_memory)

    async def fork(self, name: Optional[str] = None, count: Optional[int] = None,
                   ports: Optional[Sequence[Any]] = None,
                   names: Optional[Sequence[str]] = None):
        """Forks the VM into a sibling, or a list of them."""
        made = await _run(self._sync.fork, name, count, ports, names)
        return [Vm(v) for v in made] if isinstance(made, _list) else Vm(made)

    async def migrate(self, dest: Optional[str] = None, token: Optional[str] = None,
                      downtime_ms: Optional[int] = None, bandwidth_limit: Optional[int] = None,
                      via: Optional[str] = None) -> Any:
        """Moves the running VM live to another host (see :meth:`ferry.Vm.migrate`)."""
        return await _run(self._sync.migrate, dest, token, downtime_ms, bandwidth_limit, via)

    async def push(self, store: str, stop: bool = False) -> PushReport:
        """Pushes the VM to an S3 store (see :meth:`ferry.Vm.push`)."""
        return await _run(self._sync.push, store, stop)

    async def pause(self) -> None:
        """Stops its vCPUs."""
        await _run(self._sync.pause)

    async def resume(self) -> None:
        """Lets a paused VM run again."""
        await _run(self._sync.resume)

    async def stop(self, timeout: float = 10) -> None:
        """Asks the guest to power off; ends it after ``timeout`` seconds."""
        await _run(self._sync.stop, timeout)

    async def kill(self) -> None:
        """Ends the VM at once."""
        await _run(self._sync.kill)

    async def remove(self) -> None:
        """Ends the VM if it runs and deletes its state."""
        await _run(self._sync.remove)

    async def expose_tcp(self, host_port: int, guest_port: Optional[int] = None,
                         host_ip: Optional[str] = None) -> Port:
        """Forwards a host TCP port into the guest from now on."""
        return Port(await _run(self._sync.expose_tcp, host_port, guest_port, host_ip))

    async def workload_signal(self, sig: SignalLike) -> None:
        """Sends a signal to the VM's main command."""
        await _run(self._sync.workload_signal, sig)

    async def stats(self) -> Stats:
        """Memory use of the VM."""
        return await _run(self._sync.stats)

    async def info(self) -> VmInfo:
        """What :func:`list` shows of it."""
        return await _run(self._sync.info)

    async def status(self) -> str:
        """``"running"`` or ``"stopped"``."""
        return await _run(self._sync.status)

    async def logs(self) -> bytes:
        """The guest's serial console so far."""
        return await _run(self._sync.logs)

    async def __aenter__(self) -> "Vm":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await _run(self._sync._dispose)

    def __repr__(self) -> str:
        return f"aio.Vm(name={self.name!r})"


async def boot(image: Optional[str] = None, name: Optional[str] = None, cpus: int = 1,
               memory_mib: int = 512, ports: Iterable[PortLike] = (),
               mounts: Iterable[MountLike] = (), live_mounts: Iterable[MountLike] = (),
               net: bool = False, env: Optional[Mapping[str, Any]] = None,
               cmd: Optional[Command] = None, workdir: Optional[str] = None,
               cold: bool = False, ephemeral: bool = False,
               run_image_command: bool = True) -> Vm:
    """Boots a VM (see :func:`ferry.boot`)."""
    return Vm(await _run(_sync.boot, image, name, cpus, memory_mib, ports, mounts,
                         live_mounts, net, env, cmd, workdir, cold, ephemeral,
                         run_image_command))


async def restore(bundle: Any, name: Optional[str] = None,
                  ports: Optional[Iterable[PortLike]] = None, net: bool = False,
                  live_mounts: Iterable[str] = (), trust_bundle_config: bool = False) -> Vm:
    """Thaws a bundle from a path, an ``s3://`` address or a binary file
    object (see :func:`ferry.restore`)."""
    return Vm(await _run(_sync.restore, bundle, name, ports, net, _list(live_mounts),
                         trust_bundle_config))


class Receiver:
    """A listener for one VM migrating here (see :func:`ferry.listen_for_migration`)."""

    def __init__(self, sync: Any) -> None:
        self._sync = sync
        self.token: str = sync.token
        self.address: str = sync.address

    async def receive(self, name: Optional[str] = None,
                      ports: Optional[Iterable[PortLike]] = None, net: bool = False,
                      live_mounts: Iterable[str] = (),
                      trust_bundle_config: bool = False) -> Vm:
        """Waits for the migration; the VM once it runs here."""
        return Vm(await _run(self._sync.receive, name, ports, net, _list(live_mounts),
                             trust_bundle_config))


async def listen_for_migration(listen: str = "0.0.0.0:0") -> Receiver:
    """Listens for a VM migrating here (see :func:`ferry.listen_for_migration`)."""
    return Receiver(await _run(_sync.listen_for_migration, listen))


async def attach(name: str) -> Vm:
    """Opens an existing VM by name."""
    return Vm(await _run(_sync.attach, name))


async def list() -> List[VmInfo]:  # noqa: A001 - the API's name for it
    """Every VM on this host, sorted by name."""
    return await _run(_sync.list)


async def provision(out: Any, install: Optional[Callable[[Vm], Awaitable[Any]]] = None,
                    cmd: Optional[Command] = None, env: Optional[Mapping[str, Any]] = None,
                    workdir: Optional[str] = None, image: Optional[str] = None,
                    cpus: int = 1, memory_mib: int = 512) -> str:
    """Bakes an image; ``install`` may be a coroutine function of the VM
    (see :func:`ferry.provision`)."""
    vm = await boot(image=image, cpus=cpus, memory_mib=memory_mib, net=True, ephemeral=True)
    try:
        await _run(vm._sync._native.sync_clock)
        if install is not None:
            await _maybe_await(install(vm))
    except BaseException:
        try:
            await vm.remove()
        except FerryError:
            pass
        raise
    return await _run(vm._sync._native.bake, os.fspath(out),
                      None if cmd is None else _args.argv(cmd), _args.env_pairs(env), workdir)


async def push_bundle(bundle: Any, store: str) -> PushReport:
    """Pushes a bundle file to an S3 store (see :func:`ferry.push_bundle`)."""
    return await _run(_sync.push_bundle, bundle, store)


async def pull_bundle(url: str, dest: Any) -> PullReport:
    """Fetches a pushed VM into a bundle file (see :func:`ferry.pull_bundle`)."""
    return await _run(_sync.pull_bundle, url, dest)


async def pull_image(reference: str, insecure_registries: Iterable[str] = ()) -> ImageInfo:
    """Pulls an OCI or Docker image into ferry's image cache."""
    return await _run(_sync.pull_image, reference, _list(insecure_registries))


async def images() -> List[ImageInfo]:
    """Every pulled image, oldest first."""
    return await _run(_sync.images)


async def remove_image(name: str) -> ImageInfo:
    """Removes a pulled image."""
    return await _run(_sync.remove_image, name)


class Image(_sync.Image):
    """A warm image (see :class:`ferry.Image`); ``warmup`` may be a
    coroutine function of the :class:`Vm`."""

    @staticmethod
    async def build(ref: Optional[str] = None, image: Optional[str] = None,  # type: ignore[override]
                    name: Optional[str] = None, memory_mib: Optional[int] = None,
                    vcpus: Optional[int] = None, cmd: Optional[Command] = None,
                    env: Optional[Mapping[str, Any]] = None,
                    extra_files: Optional[Mapping[str, Any]] = None,
                    warmup: Optional[Callable[[Vm], Any]] = None,
                    warmup_tag: Optional[str] = None, listener_required: bool = False,
                    guest_port: Optional[int] = None) -> "Image":
        """Builds (or finds cached) the warm image of these inputs."""
        spec = _sync._WarmSpec(ref, image, name, memory_mib, vcpus, cmd, env, extra_files,
                               warmup, warmup_tag, listener_required, guest_port)
        key, bundle, ready = await _run(spec.slot, warmup_tag)
        if not ready:
            vm = Vm(await _run(spec.boot))
            try:
                for path, contents, mode in spec.files:
                    await vm.write_file(path, contents, mode)
                if spec.warmup is not None:
                    await _maybe_await(spec.warmup(vm))
                if spec.guest_port is not None:
                    await _run(_native.wait_for_listener, vm.name, spec.guest_port, 120.0)
                await _run(_sync._save_warm, vm._sync, bundle)
            finally:
                try:
                    await vm.remove()
                except FerryError:
                    pass
        return Image(bundle, key)

    @staticmethod
    def from_snapshot(bundle: Any) -> "Image":
        """A warm image from any snapshot bundle (which must stay in place)."""
        return Image(os.path.abspath(os.fspath(bundle)), None)

    def pool(self, min: Optional[int] = None, max: Optional[int] = None,  # type: ignore[override]
             acquire_timeout: Optional[float] = None, idle_timeout: Optional[float] = None,
             restore_on_release: Optional[bool] = None) -> "Pool":
        """A pool of VMs restored from this image."""
        return Pool(_sync.Pool(self, min, max, acquire_timeout, idle_timeout,
                               restore_on_release))


class PooledVm(Vm):
    """A VM from a pool; ``release()`` (or the end of ``async with``) gives it back."""

    def __init__(self, sync: _sync.PooledVm) -> None:
        super().__init__(sync)
        self._pooled = sync

    async def release(self) -> None:
        """Gives the VM back to its pool."""
        await _run(self._pooled.release)

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()


class Pool:
    """VMs restored from one warm image (see :class:`ferry.Pool`)."""

    def __init__(self, sync: _sync.Pool) -> None:
        self._sync = sync
        self.image = sync.image

    async def acquire(self) -> PooledVm:
        """A VM from the pool."""
        return PooledVm(await _run(self._sync.acquire))

    def stats(self) -> PoolStats:
        """The pool's counts (never waits)."""
        return self._sync.stats()

    async def shutdown(self) -> None:
        """Removes idle VMs and stops the pool."""
        await _run(self._sync.shutdown)

    async def __aenter__(self) -> "Pool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()


class Machine:
    """smolvm's ``Machine`` on asyncio: ``await Machine.create(config)``,
    ``async with Machine(config) as m:`` (deleted on exit)."""

    def __init__(self, config: Union[MachineConfig, Mapping[str, Any]]) -> None:
        self._sync = _machine.Machine(config)
        self.config = self._sync.config
        self.name = self._sync.name

    @classmethod
    async def create(cls, config: Union[MachineConfig, Mapping[str, Any]]) -> "Machine":
        """Creates the machine and starts it."""
        m = cls(config)
        await m.start()
        return m

    async def start(self) -> None:
        """Boots it the first time, thaws it after :meth:`stop`."""
        await _run(self._sync.start)

    async def stop(self) -> None:
        """Stops it, keeping its state for the next start."""
        await _run(self._sync.stop)

    async def delete(self) -> None:
        """Deletes it and its saved state."""
        await _run(self._sync.delete)

    async def status(self) -> MachineStatus:
        """Its state now."""
        return await _run(self._sync.status)

    async def exec(self, argv: Union[str, Sequence[str]], timeout: Optional[float] = None,
                   env: Optional[Mapping[str, Any]] = None,
                   workdir: Optional[str] = None) -> MachineResult:
        """Runs a command in the machine."""
        return await _run(self._sync.exec, argv, timeout, env, workdir)

    async def run(self, image: str, argv: Union[str, Sequence[str]],
                  timeout: Optional[float] = None, env: Optional[Mapping[str, Any]] = None,
                  workdir: Optional[str] = None) -> MachineResult:
        """Runs a command in an OCI image."""
        return await _run(self._sync.run, image, argv, timeout, env, workdir)

    async def __aenter__(self) -> "Machine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.delete()

    def __repr__(self) -> str:
        return f"aio.Machine(name={self.name!r})"
