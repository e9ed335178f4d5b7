"""One daemon per state directory: an flock on `<state_dir>/agentd.pid`, held for life."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agentd.errors import EXIT_NOT_NOW, AgentdError

PID_FILE = "agentd.pid"


class DaemonRunning(AgentdError):
    """Another daemon already holds the state directory (exit 75: not run now)."""

    exit_code = EXIT_NOT_NOW


def acquire_pid_lock(state_dir: Path) -> int:
    """flock `<state_dir>/agentd.pid` for the life of the process; DaemonRunning if held.

    The file is never removed: unlinking a locked file lets two daemons lock two different
    inodes. The kernel drops the lock when the process dies, even by kill -9.
    """
    path = state_dir / PID_FILE
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AgentdError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {other})" if other.isdigit() else ""
        raise DaemonRunning(
            f"another agentd daemon{who} is already running on state directory {state_dir}"
        ) from None
    if os.geteuid() == 0:
        # Started as root on the service's state directory: leave the file to its owner.
        st = state_dir.stat()
        if st.st_uid != 0:
            os.fchown(fd, st.st_uid, st.st_gid)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
