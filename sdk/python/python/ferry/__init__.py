"""ferry from Python: boot Linux microVMs, run commands in them, freeze them
into bundles, thaw them anywhere, fork them.

The blocking API is here (``ferry.boot``, ``ferry.restore``, ...); the same
API on asyncio is :mod:`ferry.aio`. Every call that waits releases the GIL.
VMs run in their own processes and outlive this one unless removed; ``with
ferry.boot(...) as vm:`` removes the VM at the end of the block.

Failures raise :class:`FerryError` (or a subclass per family of codes) with
a stable ``code``, a ``hint`` and ``retryable``.
"""

from ._errors import (
    AgentError,
    BakeError,
    BootError,
    BundleError,
    ExecError,
    FerryError,
    FileError,
    ForkError,
    ImageError,
    InstallError,
    InvalidArgument,
    KvmError,
    MigrateError,
    MountError,
    NetworkError,
    PoolError,
    PoolExhausted,
    PortError,
    PortInUse,
    RestoreError,
    SnapshotError,
    StoreError,
    TemplateError,
    VmError,
    VmmError,
    VmNameTaken,
    VmNotFound,
    VmNotRunning,
    error_class,
)
from ._machine import (
    Machine,
    MachineConfig,
    MachineResult,
    MachineStatus,
    MountSpec,
    PortSpec,
    ResourceSpec,
)
from ._sync import (
    Child,
    ExecResult,
    Exit,
    Image,
    ImageInfo,
    Pool,
    PooledVm,
    PoolStats,
    Port,
    PullReport,
    PushReport,
    Receiver,
    SnapshotReport,
    Stats,
    Vm,
    VmInfo,
    attach,
    boot,
    error_codes,
    images,
    list,
    listen_for_migration,
    provision,
    pull_bundle,
    pull_image,
    push_bundle,
    remove_image,
    restore,
)

from . import aio  # noqa: E402 - ferry.aio is there after `import ferry`

__version__ = "0.1.0"

# list() is left out of __all__: a star import would hide the builtin.
__all__ = [
    "aio", "boot", "restore", "attach", "listen_for_migration", "Receiver",
    "provision", "pull_image", "images", "push_bundle", "pull_bundle",
    "remove_image", "error_codes", "error_class", "Vm", "Child", "Port", "Image",
    "Pool", "PooledVm", "ExecResult", "Exit", "Stats", "SnapshotReport", "VmInfo",
    "PushReport", "PullReport", "ImageInfo", "PoolStats", "Machine", "MachineConfig", "MachineResult",
    "MachineStatus", "MountSpec", "PortSpec", "ResourceSpec", "FerryError",
    "InvalidArgument", "VmError", "VmNotFound", "VmNotRunning", "VmNameTaken",
    "BootError", "PortError", "PortInUse", "MountError", "NetworkError",
    "AgentError", "ExecError", "FileError", "SnapshotError", "BundleError",
    "RestoreError", "ForkError", "MigrateError", "ImageError", "BakeError",
    "PoolError", "StoreError",
    "PoolExhausted", "KvmError", "VmmError", "InstallError", "TemplateError",
]
