"""ferry's exceptions: one base class, one subclass per family of codes.

Every failure carries a stable ``code`` (the table in docs/errors.md), a
``hint`` on what to do and whether the same call may succeed if ``retryable``.
The native extension makes them through :func:`from_failure`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type


class FerryError(Exception):
    """A failure of ferry, with a stable ``code`` programs can match on."""

    code: str
    hint: Optional[str]
    retryable: bool

    def __init__(
        self,
        message: str,
        code: str = "SDK_INTERNAL",
        hint: Optional[str] = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint
        self.retryable = bool(retryable)

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def __reduce__(self):  # pickles keep code, hint and retryable
        return (type(self), (self.message, self.code, self.hint, self.retryable))


class InvalidArgument(FerryError, ValueError, TypeError):
    """An argument with the wrong type or value (SDK_INVALID_ARGUMENT, USAGE_*)."""


class VmError(FerryError):
    """A VM's state or lifecycle (VM_*, WORKLOAD_*, PAUSE_*, MAIN_*)."""


class VmNotFound(VmError, LookupError):
    """No VM has that name (VM_NOT_FOUND)."""


class VmNotRunning(VmError):
    """The VM is stopped (VM_NOT_RUNNING)."""


class VmNameTaken(VmError):
    """Another VM has that name (VM_NAME_TAKEN)."""


class BootError(FerryError):
    """A boot failed (BOOT_*, KERNEL_*, INITRAMFS_*)."""


class PortError(FerryError):
    """A host port forward (BOOT_PORT_FORWARD_*, FORWARD_*)."""


class PortInUse(PortError):
    """The host port is taken (BOOT_PORT_FORWARD_IN_USE); retryable."""


class MountError(FerryError):
    """A host directory in a VM (BOOT_MOUNT_*, RESTORE_MOUNT_*, FS_SHARE_*)."""


class NetworkError(FerryError):
    """The guest's outbound network (BOOT_NET_*, NET_*)."""


class AgentError(FerryError):
    """The guest agent or the connection to it (AGENT_*, GUEST_*)."""


class ExecError(FerryError):
    """A command could not run (EXEC_*). A command that runs and fails is a
    result with its ``exit_code``, not an exception."""


class FileError(FerryError):
    """A file in the guest or on the host (FILE_*, LOCAL_*, COPY_*)."""


class SnapshotError(FerryError):
    """A snapshot failed (SNAPSHOT_*)."""


class BundleError(FerryError):
    """A bundle file is unreadable or not one (BUNDLE_*)."""


class RestoreError(FerryError):
    """A restore failed (RESTORE_*)."""


class ForkError(FerryError):
    """A fork failed (FORK_*)."""


class MigrateError(FerryError):
    """A live migration (MIGRATE_*); the source VM runs on where it was."""


class ImageError(FerryError):
    """An image: missing, unreadable, or its registry (IMAGE_*, REGISTRY_*)."""


class BakeError(FerryError):
    """Baking or provisioning an image (BAKE_*)."""


class PoolError(FerryError):
    """A pool of VMs (POOL_*)."""


class PoolExhausted(PoolError):
    """No VM came free in time (POOL_EXHAUSTED)."""


class StoreError(FerryError):
    """An S3 store of pushed VMs (STORE_*); STORE_UNREACHABLE is retryable.
    A fetched chunk that does not match its hash is a BundleError
    (BUNDLE_CORRUPT)."""


class KvmError(FerryError):
    """This host's KVM (KVM_*)."""


class VmmError(FerryError):
    """The VMM process (VMM_*, CONTROL_*, and its device setup)."""


class InstallError(FerryError):
    """Guest kernel and root filesystem assets (INSTALL_*, ASSETS_*)."""


class TemplateError(FerryError):
    """Boot templates (TEMPLATE_*)."""


# Codes with a class of their own, then families by prefix: the first
# matching prefix wins, so narrower prefixes come first.
_EXACT: Dict[str, Type[FerryError]] = {
    "VM_NOT_FOUND": VmNotFound,
    "VM_NOT_RUNNING": VmNotRunning,
    "VM_NAME_TAKEN": VmNameTaken,
    "BOOT_PORT_FORWARD_IN_USE": PortInUse,
    "POOL_EXHAUSTED": PoolExhausted,
    "AGENT_NOT_STATIC": BootError,
    "SDK_INVALID_ARGUMENT": InvalidArgument,
    "INVALID_CONFIG": VmmError,
}
_PREFIXES: Tuple[Tuple[str, Type[FerryError]], ...] = (
    ("BOOT_PORT_FORWARD_", PortError),
    ("FORWARD_", PortError),
    ("BOOT_MOUNT_", MountError),
    ("RESTORE_MOUNT_", MountError),
    ("RESTORE_REMAP_", MountError),
    ("FS_SHARE_", MountError),
    ("BOOT_NET_", NetworkError),
    ("NET_", NetworkError),
    ("VM_", VmError),
    ("WORKLOAD_", VmError),
    ("PAUSE_", VmError),
    ("MAIN_", VmError),
    ("BOOT_", BootError),
    ("KERNEL_", BootError),
    ("INITRAMFS_", BootError),
    ("AGENT_", AgentError),
    ("GUEST_", AgentError),
    ("EXEC_", ExecError),
    ("FILE_", FileError),
    ("LOCAL_", FileError),
    ("COPY_", FileError),
    ("CP_", FileError),
    ("SNAPSHOT_", SnapshotError),
    ("BUNDLE_", BundleError),
    ("RESTORE_", RestoreError),
    ("FORK_", ForkError),
    ("MIGRATE_", MigrateError),
    ("IMAGE_", ImageError),
    ("REGISTRY_", ImageError),
    ("BAKE_", BakeError),
    ("POOL_", PoolError),
    ("STORE_", StoreError),
    ("KVM_", KvmError),
    ("VMM_", VmmError),
    ("CONTROL_", VmmError),
    ("MEMORY_", VmmError),
    ("VCPU_", VmmError),
    ("THREAD_", VmmError),
    ("CONSOLE_", VmmError),
    ("DISK_", VmmError),
    ("VSOCK_", VmmError),
    ("DEVICE_", VmmError),
    ("INSTALL_", InstallError),
    ("ASSETS_", InstallError),
    ("USAGE_", InvalidArgument),
    ("TEMPLATE_", TemplateError),
)


def error_class(code: str) -> Type[FerryError]:
    """The exception class of a code (FerryError itself for codes of no family)."""
    exact = _EXACT.get(code)
    if exact is not None:
        return exact
    for prefix, cls in _PREFIXES:
        if code.startswith(prefix):
            return cls
    return FerryError


def from_failure(
    code: str, message: str, hint: Optional[str], retryable: bool
) -> FerryError:
    """The exception for a failure reported by the native extension."""
    return error_class(code)(message, code, hint, retryable)


def invalid(message: str) -> InvalidArgument:
    """An InvalidArgument raised by the Python layer."""
    return InvalidArgument(message, "SDK_INVALID_ARGUMENT", None, False)
