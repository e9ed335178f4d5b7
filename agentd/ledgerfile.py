"""The ledger file: created private to its owner, set up under a lock, our settings."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "ledger.lock"
BUSY_TIMEOUT_MS = 30_000


def _adopt_owner(fd: int, reference: Path) -> None:
    """Running as root, give a file we create to the owner of `reference` (the service user).

    Otherwise `sudo agentd once` on a fresh state directory would leave a root-owned 0600 file
    that the daemon, running as its own user, cannot open.
    """
    if os.geteuid() != 0:
        return
    st = reference.stat()
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def create_private(path: Path, reference: Path) -> None:
    """Create `path` mode 0600 if missing (umask can only narrow it), owned like `reference`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        _adopt_owner(fd, reference)
    finally:
        os.close(fd)


@contextmanager
def setup_lock(state_dir: Path, db_path: Path) -> Iterator[None]:
    """Serialize first-open setup across processes with flock on `<state_dir>/ledger.lock`.

    The switch to WAL cannot run inside a transaction, so it cannot share the migrations'
    `BEGIN IMMEDIATE`; this lock makes "switch to WAL, then migrate" one critical section across
    processes. Openers that find the work done (the common case) never take it.
    """
    lock_path = state_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _adopt_owner(fd, db_path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def connect(path: Path, *, read_only: bool, immutable: bool) -> sqlite3.Connection:
    """A connection with agentd's settings: busy timeout, foreign keys, synchronous=NORMAL."""
    if read_only:
        uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    if not read_only:
        # A checkpoint (pages copied back, the file fsynced) runs inside the commit that
        # crosses this size: on the event loop, in the middle of some call. The daemon
        # checkpoints from a worker thread long before (`agentd.housekeeping`); this bound is
        # the safety net for processes without one (10,000 pages, 40 MB, not SQLite's 1,000).
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    return conn


WAL_AUTOCHECKPOINT_PAGES = 10_000
