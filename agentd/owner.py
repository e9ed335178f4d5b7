"""Process identity for ledger rows: who owns a pending reservation, and whether it is still alive.

An owner is `host:pid:starttime:bootid`. `starttime` is field 22 of `/proc/<pid>/stat` (clock
ticks since boot), so a recycled pid is told apart from the process that wrote the row; the boot
id (`/proc/sys/kernel/random/boot_id`) tells a process of an earlier boot apart from one that got
the same pid and the same start tick after a reboot (deterministic boots make that likely enough
to matter for a daemon started by systemd). Off Linux both are `0` and only the pid is checked.

The check is deliberately one-sided: `owner_alive` answers False only when it *knows* the owner
is gone, because reconciling a live process's reservation would let it overspend. An owner on
another host, or one we cannot parse, is alive. Processes in another pid namespace that share our
hostname (two containers with the same hostname on one ledger volume) cannot be told apart: give
such containers distinct hostnames.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_PROC = Path("/proc")
_GONE_STATES = frozenset({"Z", "X", "x"})  # zombie or dead: the process will never settle a row

_cached: tuple[int, str] | None = None


def _hostname() -> str:
    # A colon would break the owner format; hostnames cannot contain one, but be safe.
    return socket.gethostname().replace(":", "_") or "localhost"


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip() or "0"
    except OSError:
        return "0"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, starttime) of a pid from /proc, or None when there is no such process."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); field 22 (starttime) is therefore fields[19].
    return fields[0], fields[19]


def _start_time(pid: int) -> str:
    if not _PROC.joinpath("self", "stat").exists():
        return "0"
    try:
        stat = _proc_stat(pid)
    except (OSError, ValueError, IndexError):
        return "0"
    return "0" if stat is None else stat[1]


def current_owner() -> str:
    """This process's owner string, `host:pid:starttime:bootid`."""
    global _cached
    pid = os.getpid()
    # Cached per pid: a forked child must not inherit its parent's identity.
    if _cached is None or _cached[0] != pid:
        _cached = (pid, f"{_hostname()}:{pid}:{_start_time(pid)}:{_boot_id()}")
    return _cached[1]


def _pid_exists(pid: int) -> bool:
    """Portable fallback when /proc is not available."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just is not ours
    except OSError:
        return True
    return True


def owner_alive(owner: str) -> bool:
    """False only when we can tell the owner process is gone (same host, and dead or pid reused)."""
    parts = owner.split(":")
    if len(parts) not in (3, 4):
        return True
    host, pid_text, start = parts[0], parts[1], parts[2]
    boot = parts[3] if len(parts) == 4 else "0"
    if host != _hostname():
        return True  # we cannot see another host's processes: never reconcile them
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if pid <= 0:
        return True
    ours = _boot_id()
    if boot != "0" and ours != "0" and boot != ours:
        return False  # written before the last reboot: every process of that boot is gone
    if not _PROC.joinpath("self", "stat").exists():
        return _pid_exists(pid)
    try:
        stat = _proc_stat(pid)
    except (OSError, ValueError, IndexError):
        return True
    if stat is None:
        # /proc may hide other users' processes (hidepid, systemd's ProtectProc=invisible):
        # ask the kernel directly before declaring the owner gone.
        return _pid_exists(pid)
    state, now_start = stat
    if state in _GONE_STATES:
        return False
    return start == "0" or now_start == start
