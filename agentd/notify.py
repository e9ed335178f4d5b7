"""systemd's sd_notify protocol with the stdlib: READY, RELOADING, STOPPING, STATUS, WATCHDOG."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from agentd.logs import get_logger

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
_STATUS_MAX = 400  # systemctl status shows one line; keep STATUS= short


def notify_address(value: str) -> str | None:
    """The AF_UNIX address of `$NOTIFY_SOCKET`: `@name` is the abstract namespace (`\\0name`)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other schemes are not used by the system manager for services


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None when not asked for.

    `$WATCHDOG_PID`, when set, must be this process: the watchdog belongs to the main process.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get(ENV_WATCHDOG_USEC, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get(ENV_WATCHDOG_PID)
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2 / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify datagrams to the service manager; a no-op when `$NOTIFY_SOCKET` is unset."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._log = get_logger()

    @classmethod
    def from_env(
        cls, env: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """A notifier for `$NOTIFY_SOCKET`; with `unset`, remove the variables from `env`.

        Removing them (like `sd_notify(unset_environment=1)`) keeps commands that loops run
        (context sources, deliveries) from talking to systemd in the daemon's name.
        """
        env = os.environ if env is None else env
        address = notify_address(env.get(ENV_NOTIFY_SOCKET, ""))
        if unset:
            env.pop(ENV_NOTIFY_SOCKET, None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; returns whether it was sent.

        Never raises and never blocks: a full or missing socket must not stop the daemon.
        """
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            self._log.debug("notify.failed", error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (after start-up, and after every reload, refused or not)."""
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        """RELOADING=1 with the MONOTONIC_USEC= that Type=notify-reload expects."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the daemon is draining and will exit."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        """STATUS=: the one line `systemctl status` shows."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the event loop is alive."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (sending again reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    if not text:
        return []
    # A newline would start a new assignment: the status is one line.
    line = " ".join(text.split())
    return [f"STATUS={line[:_STATUS_MAX]}"]
