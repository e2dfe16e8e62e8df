"""smolvm's shape over ferry: ``Machine``, ``MachineConfig``, ``MountSpec``,
``ResourceSpec``. A machine is a named VM; ``stop()`` freezes it into a
bundle in ferry's data directory and ``start()`` thaws it, so a stopped
machine keeps its disk, its memory and its processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from . import _args, _native, _sync
from ._errors import FerryError, VmNotFound, invalid


@dataclass
class ResourceSpec:
    """vCPUs and memory of a machine."""

    cpus: int = 1
    memory_mb: int = 512


@dataclass
class MountSpec:
    """A host directory shared live into the machine at ``target``."""

    source: str
    target: str
    read_only: bool = False


@dataclass
class PortSpec:
    """Host TCP port ``host`` forwarded to guest port ``guest``."""

    host: int
    guest: int


@dataclass
class MachineConfig:
    """What a machine is: its name, mounts, ports and resources, and (ferry's
    additions) the image it boots, its environment and outbound network."""

    name: str
    mounts: List[MountSpec] = field(default_factory=list)
    ports: List[Union[PortSpec, str, tuple]] = field(default_factory=list)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    image: Optional[str] = None
    env: Optional[Dict[str, str]] = None
    net: bool = False


@dataclass
class MachineStatus:
    """A machine's state: ``"created"`` (never started), ``"running"``,
    ``"stopped"`` or ``"deleted"``."""

    name: str
    state: str
    cpus: int
    memory_mb: int
    ports: List[str]


@dataclass
class MachineResult:
    """A finished command: output decoded as UTF-8 (``stdout_bytes`` and
    ``stderr_bytes`` as they came)."""

    exit_code: Optional[int]
    stdout: str
    stderr: str
    signal: Optional[int]
    timed_out: bool
    stdout_bytes: bytes
    stderr_bytes: bytes

    @staticmethod
    def of(r: _sync.ExecResult) -> "MachineResult":
        return MachineResult(
            exit_code=r.exit_code,
            stdout=r.stdout.decode("utf-8", "replace"),
            stderr=r.stderr.decode("utf-8", "replace"),
            signal=r.signal,
            timed_out=r.timed_out,
            stdout_bytes=r.stdout,
            stderr_bytes=r.stderr,
        )


def _config_of(d: Mapping[str, Any]) -> MachineConfig:
    """A MachineConfig from plain data: ``{"name": ..., "mounts": [{"source":
    ..., "target": ...}], "resources": {"cpus": ..., "memory_mb": ...}}``."""
    fields = dict(d)
    try:
        mounts = fields.get("mounts") or []
        fields["mounts"] = [MountSpec(**m) if isinstance(m, Mapping) else m for m in mounts]
        ports = fields.get("ports") or []
        fields["ports"] = [PortSpec(**p) if isinstance(p, Mapping) else p for p in ports]
        resources = fields.get("resources")
        if isinstance(resources, Mapping):
            fields["resources"] = ResourceSpec(**resources)
        elif resources is None:
            fields["resources"] = ResourceSpec()
        return MachineConfig(**fields)
    except TypeError as e:
        raise invalid(f"machine config: {e}") from None


def _argv(cmd: Union[str, Sequence[str]]) -> List[str]:
    return _args.argv(cmd)


class Machine:
    """A named microVM (smolvm's ``Machine``). ``Machine.create(config)``
    starts it; ``with Machine(config) as m:`` deletes it on exit, also when
    the block raises."""

    def __init__(self, config: Union[MachineConfig, Mapping[str, Any]]) -> None:
        if isinstance(config, Mapping):
            config = _config_of(config)
        if not isinstance(config, MachineConfig) or not config.name:
            raise invalid("a machine needs a MachineConfig with a name")
        self.config = config
        self.name = config.name
        self._deleted = False

    @classmethod
    def create(cls, config: Union[MachineConfig, Mapping[str, Any]]) -> "Machine":
        """Creates the machine and starts it."""
        m = cls(config)
        m.start()
        return m

    @property
    def _bundle(self) -> str:
        return os.path.join(os.fspath(_native.data_dir()), "machines", f"{self.name}.bundle")

    def _vm(self) -> Optional[_sync.Vm]:
        try:
            return _sync.attach(self.name)
        except VmNotFound:
            return None

    def _ports(self) -> List[str]:
        return _args.port_specs(self.config.ports)

    def start(self) -> None:
        """Starts the machine: boots it the first time, thaws it after
        :meth:`stop`. Does nothing while it runs."""
        vm = self._vm()
        if vm is not None:
            if vm.status() == "running":
                return
            vm.remove()  # a VM that died: its state is of no use
        c = self.config
        if os.path.exists(self._bundle):
            _sync.restore(
                self._bundle,
                name=self.name,
                ports=self._ports(),
                net=c.net,
                live_mounts=[os.path.realpath(os.fspath(m.source)) for m in c.mounts],
            )
        else:
            _sync.boot(
                image=c.image,
                name=self.name,
                cpus=c.resources.cpus,
                memory_mib=c.resources.memory_mb,
                ports=self._ports(),
                live_mounts=c.mounts,
                net=c.net,
                env=c.env,
            )
        self._deleted = False

    def stop(self) -> None:
        """Stops the machine, keeping its state (disk, memory, processes)
        for the next :meth:`start`."""
        vm = self._vm()
        if vm is None or vm.status() != "running":
            return
        os.makedirs(os.path.dirname(self._bundle), exist_ok=True)
        partial = f"{self._bundle}.{os.getpid()}.partial"
        try:
            # The running VM may be mapping the old bundle: write beside it.
            vm.snapshot(partial, thin=True)
            os.replace(partial, self._bundle)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def delete(self) -> None:
        """Deletes the machine and its saved state. Permanent."""
        vm = self._vm()
        if vm is not None:
            # Stopped first: stop returns once the VMM has exited and its
            # host ports are free for the next machine of this config.
            vm._dispose()
        if os.path.exists(self._bundle):
            os.remove(self._bundle)
        self._deleted = True

    def status(self) -> MachineStatus:
        """The machine's state now."""
        vm = self._vm()
        if vm is not None and vm.status() == "running":
            state = "running"
        elif os.path.exists(self._bundle) or vm is not None:
            state = "stopped"
        else:
            state = "deleted" if self._deleted else "created"
        return MachineStatus(
            name=self.name,
            state=state,
            cpus=self.config.resources.cpus,
            memory_mb=self.config.resources.memory_mb,
            ports=self._ports(),
        )

    def _running(self) -> _sync.Vm:
        vm = self._vm()
        if vm is None:
            raise VmNotFound(
                f"machine {self.name!r} is not started", "VM_NOT_FOUND",
                "call start() (Machine.create starts it)", False,
            )
        return vm

    def exec(
        self,
        argv: Union[str, Sequence[str]],
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, Any]] = None,
        workdir: Optional[str] = None,
    ) -> MachineResult:
        """Runs a command in the machine."""
        vm = self._running()
        return MachineResult.of(vm.exec(_argv(argv), env=env, cwd=workdir, timeout=timeout))

    def run(
        self,
        image: str,
        argv: Union[str, Sequence[str]],
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, Any]] = None,
        workdir: Optional[str] = None,
    ) -> MachineResult:
        """Runs a command in an OCI image (pulled when not cached): a VM of
        the machine's resources and mounts boots from the image, runs the
        command with the image's environment, working directory and user,
        and is removed."""
        c = self.config
        vm = _sync.boot(
            image=image,
            cpus=c.resources.cpus,
            memory_mib=c.resources.memory_mb,
            live_mounts=c.mounts,
            net=c.net,
            # Idle: the command runs as an exec, not as the image's own.
            run_image_command=False,
            ephemeral=True,
        )
        try:
            return MachineResult.of(vm.exec(_argv(argv), env=env, cwd=workdir, timeout=timeout))
        finally:
            try:
                vm.remove()
            except FerryError:
                pass

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"Machine(name={self.name!r})"
