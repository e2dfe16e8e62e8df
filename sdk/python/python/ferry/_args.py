"""Argument shapes shared by the sync and asyncio APIs: ports, mounts,
commands, environments, signals, file data."""

from __future__ import annotations

import os
import signal as _signal
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from ._errors import FerryError, invalid

PortLike = Union[str, int, Tuple[int, int], Tuple[str, int, int], Any]
"""``"3000:3000"``, ``"127.0.0.1:3000:3000"``, ``3000``, ``(host, guest)`` or a
:class:`ferry.PortSpec`."""
MountLike = Union[str, Tuple[str, str], Any]
"""``"HOST:GUEST[:ro]"``, ``(host, guest)`` or a :class:`ferry.MountSpec`."""
Command = Union[str, Sequence[str]]
"""An argv list, or a string run with ``/bin/sh -c``."""
Data = Union[bytes, bytearray, memoryview, str]
"""File or stdin contents; a str is encoded as UTF-8."""
SignalLike = Union[int, str, _signal.Signals]
"""``15``, ``"SIGTERM"``, ``"TERM"`` or ``signal.SIGTERM``."""


class ExecArgs(NamedTuple):
    """How to run a command, as the native extension takes it."""

    env: List[Tuple[str, str]]
    cwd: Optional[str]
    user: Optional[str]
    timeout: Optional[float]
    tty: Optional[Tuple[int, int]]


def port_spec(p: PortLike) -> str:
    """One port forward in the CLI's ``[HOST_IP:]HOST:GUEST`` spelling."""
    try:
        return _port_spec(p)
    except (TypeError, ValueError) as e:
        if isinstance(e, FerryError):
            raise
        raise invalid(f"port {p!r}: expected 'HOST:GUEST' or (host, guest)") from None


def _port_spec(p: PortLike) -> str:
    if isinstance(p, str):
        return p
    if isinstance(p, bool):
        raise invalid(f"port {p!r}: expected 'HOST:GUEST' or (host, guest)")
    if isinstance(p, int):
        return f"{p}:{p}"
    if isinstance(p, tuple) and len(p) == 2:
        return f"{int(p[0])}:{int(p[1])}"
    if isinstance(p, tuple) and len(p) == 3:
        ip = str(p[0])
        ip = f"[{ip}]" if ":" in ip else ip
        return f"{ip}:{int(p[1])}:{int(p[2])}"
    host = getattr(p, "host", None)
    if host is not None:
        guest = getattr(p, "guest", None)
        return f"{int(host)}:{int(guest if guest is not None else host)}"
    raise invalid(f"port {p!r}: expected 'HOST:GUEST' or (host, guest)")


def port_specs(ports: Optional[Iterable[PortLike]]) -> List[str]:
    """Every port forward, as specs."""
    if ports is None:
        return []
    if isinstance(ports, (str, int, tuple)) and not _is_list_of_ports(ports):
        raise invalid("ports must be a list, e.g. ['3000:3000'] or [(3000, 3000)]")
    return [port_spec(p) for p in ports]


def _is_list_of_ports(ports: Any) -> bool:
    # A tuple of tuples is a list of ports; a tuple of two ints is one port.
    return isinstance(ports, tuple) and all(isinstance(p, (str, tuple)) for p in ports)


def mount_spec(m: MountLike) -> str:
    """One mount in the CLI's ``HOST:GUEST[:ro]`` spelling."""
    if isinstance(m, str):
        return m
    if isinstance(m, tuple) and len(m) in (2, 3):
        ro = len(m) == 3 and bool(m[2])
        return f"{os.fspath(m[0])}:{m[1]}" + (":ro" if ro else "")
    source = getattr(m, "source", None)
    target = getattr(m, "target", None)
    if source is not None and target is not None:
        ro = bool(getattr(m, "read_only", False))
        return f"{os.fspath(source)}:{target}" + (":ro" if ro else "")
    raise invalid(f"mount {m!r}: expected 'HOST:GUEST' or (host, guest)")


def mount_specs(mounts: Optional[Iterable[MountLike]]) -> List[str]:
    """Every mount, as specs."""
    if mounts is None:
        return []
    if isinstance(mounts, str):
        raise invalid("mounts must be a list, e.g. ['/src:/src']")
    return [mount_spec(m) for m in mounts]


def argv(cmd: Command) -> List[str]:
    """A command as argv: a string runs with ``/bin/sh -c``."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    if isinstance(cmd, (bytes, bytearray)):
        raise invalid("the command must be a str or a list of str")
    try:
        out = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in cmd]
    except TypeError:
        raise invalid("the command must be a str or a list of str") from None
    if not out:
        raise invalid("the command is empty")
    if not all(isinstance(a, (str, int, float)) for a in out):
        raise invalid("every argument of the command must be a str")
    return [str(a) for a in out]


def env_pairs(env: Optional[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """An environment mapping as sorted pairs of strings."""
    if env is None:
        return []
    if not isinstance(env, Mapping):
        raise invalid("env must be a mapping of names to values")
    return sorted((str(k), str(v)) for k, v in env.items())


def env_dict(env: Optional[Mapping[str, Any]]) -> Optional[Dict[str, str]]:
    """An environment mapping of strings, or None."""
    return None if env is None else dict(env_pairs(env))


def data(d: Data, what: str) -> bytes:
    """File contents as bytes."""
    if isinstance(d, bytes):
        return d
    if isinstance(d, str):
        return d.encode()
    if isinstance(d, (bytearray, memoryview)):
        return bytes(d)
    raise invalid(f"{what} must be bytes, bytearray, memoryview or str")


def signal_number(sig: SignalLike) -> int:
    """A signal as its number."""
    if isinstance(sig, bool):
        raise invalid(f"unknown signal {sig!r}")
    if isinstance(sig, int):
        return int(sig)
    if isinstance(sig, str):
        name = sig.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(_signal, name, None)
        if isinstance(number, _signal.Signals):
            return int(number)
    raise invalid(f"unknown signal {sig!r}")


def count(v: Any, what: str, low: int = 1, high: int = 2**32 - 1) -> int:
    """A whole number in ``low..=high``."""
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise invalid(f"{what} must be a whole number from {low} to {high}, not {v!r}")
    return int(v)


def seconds(t: Optional[float], what: str) -> Optional[float]:
    """A duration in seconds, checked."""
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 or t != t:
        raise invalid(f"{what} must be a number of seconds >= 0, not {t!r}")
    return float(t)


def exec_args(
    env: Optional[Mapping[str, Any]],
    cwd: Optional[str],
    user: Optional[Union[str, int]],
    timeout: Optional[float],
    tty: Optional[Tuple[int, int]] = None,
) -> ExecArgs:
    """The native extension's exec options."""
    return ExecArgs(
        env=env_pairs(env),
        cwd=None if cwd is None else os.fspath(cwd),
        user=None if user is None else str(user),
        timeout=seconds(timeout, "timeout"),
        tty=tty,
    )


def staged(files: Mapping[str, Any]) -> List[Tuple[str, bytes, int]]:
    """Files to write before a command: path -> data or (data, mode)."""
    if not isinstance(files, Mapping):
        raise invalid("stage_files must be a mapping of guest paths to data or (data, mode)")
    out = []
    for path, spec in files.items():
        if isinstance(spec, tuple):
            contents, mode = spec
        else:
            contents, mode = spec, 0o644
        out.append((str(path), data(contents, f"staged file {path}"), int(mode)))
    return out
