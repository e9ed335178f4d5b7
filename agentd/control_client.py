"""The CLI's side of the control API: a synchronous client over the Unix socket, and its output.

The CLI commands map onto two functions:

- `agentd status [--json]` → `status_command(sock, as_json)`: text to print, exit 0.
- `agentd trigger LOOP | pause LOOP | resume LOOP | reload` → `action_command(sock, action,
  loop)`: (text, exit code). Print the text on stdout when the code is 0, else on stderr.
  Exit codes: 0 done; 2 unknown or invalid loop name; 75 not now (the loop is busy, paused or
  over budget); 1 a refused reload (the old config keeps running) or a daemon-side error.

Both raise `DaemonNotRunning` (exit code 1) when no daemon listens on the socket (`agentd
resume LOOP` then clears the pause in the ledger itself: `resume_in_ledger`), and
`AgentdError` (exit code 1) when the socket cannot be used (permissions, timeout): the CLI's
error handler prints the message. Find the socket with `find_socket`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agentd.control import JSON_TYPE, LOOP_NAME, check_socket_path, socket_path
from agentd.errors import (
    EXIT_FAILED,
    EXIT_NOT_NOW,
    EXIT_OK,
    EXIT_USAGE,
    AgentdError,
    LedgerError,
)
from agentd.ledger import parse_iso
from agentd.reports import Column, to_table

# Where `RuntimeDirectory=agentd` puts the socket: an operator's shell has no $RUNTIME_DIRECTORY.
SYSTEM_SOCKET = Path("/run/agentd/agentd.sock")
ACTIONS = ("trigger", "pause", "resume", "reload")
ACTION_TIMEOUT_S = 30.0  # a reload re-reads and validates the config; allow it some time
_NOTE_MAX = 160


class DaemonNotRunning(AgentdError):
    """No daemon answers on the control socket (exit code 1: the command was not carried out)."""

    exit_code = EXIT_FAILED

    def __init__(self, path: Path, *, stale: bool = False) -> None:
        self.path = path
        where = f"nothing answers on {path}" if stale else f"no socket at {path}"
        super().__init__(
            f"no agentd daemon is running ({where}); start it with 'agentd run' or "
            "'systemctl start agentd'"
        )


class UnixHTTPConnection(http.client.HTTPConnection):
    """An `http.client` connection whose transport is a Unix socket instead of TCP."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        """Open the Unix socket (in place of a TCP connection)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.unix_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def find_socket(
    state_dir: Path,
    env: Mapping[str, str] | None = None,
    fallbacks: Sequence[Path] = (SYSTEM_SOCKET,),
) -> Path:
    """The daemon's socket as `socket_path` finds it, else the first existing fallback.

    Under systemd the socket is `/run/agentd/agentd.sock`, but an operator's shell sets no
    `$RUNTIME_DIRECTORY`; pass `fallbacks=()` when the state directory was given explicitly.
    """
    primary = socket_path(state_dir, env)
    if primary.exists():
        return primary
    return next((p for p in fallbacks if p.exists()), primary)


def request(path: Path, method: str, url: str, timeout: float = 10) -> tuple[int, Any]:
    """One HTTP request to the daemon: (status, body), the body parsed when it is JSON."""
    check_socket_path(path)
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url, headers={"Accept": JSON_TYPE})
        response = conn.getresponse()
        data = response.read()
        content_type = response.getheader("Content-Type", "")
    except (FileNotFoundError, NotADirectoryError):
        raise DaemonNotRunning(path) from None
    except ConnectionRefusedError:
        raise DaemonNotRunning(path, stale=True) from None
    except PermissionError:
        raise AgentdError(
            f"permission denied on the control socket {path}: it is mode 0600, owned by the "
            "daemon's user; run the command as that user (e.g. sudo -u agentd agentd status)"
        ) from None
    except TimeoutError:
        raise AgentdError(f"the daemon did not answer on {path} within {timeout:g} s") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise AgentdError(
            f"the daemon on {path} closed the connection without an answer "
            f"({type(exc).__name__}); see its log"
        ) from None
    except OSError as exc:
        raise AgentdError(f"cannot reach the daemon on {path}: {exc.strerror or exc}") from None
    finally:
        conn.close()
    if content_type.startswith(JSON_TYPE):
        try:
            return response.status, json.loads(data)
        except ValueError:
            pass  # shown as text below
    return response.status, data.decode("utf-8", "replace")


# ---------------------------------------------------------------------------- commands


def status_command(sock: Path, as_json: bool) -> str:
    """`agentd status [--json]`: the daemon's status as a table, or its JSON as sent."""
    status, body = request(sock, "GET", "/status")
    if status != 200 or not isinstance(body, dict):
        raise AgentdError(f"the daemon answered {status}: {_error_text(body)}")
    return json.dumps(body, indent=2, sort_keys=True) if as_json else format_status(body)


def action_command(sock: Path, action: str, loop: str | None = None) -> tuple[str, int]:
    """`agentd trigger|pause|resume LOOP` and `agentd reload`: (text, exit code)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    if (action == "reload") != (loop is None):
        raise ValueError(f"{action} takes {'no loop' if action == 'reload' else 'a loop'}")
    if loop is not None and not LOOP_NAME.match(loop):
        return f"invalid loop name {loop!r}: use letters, digits, '-' and '_'", EXIT_USAGE
    url = "/reload" if loop is None else f"/{action}/{loop}"
    status, body = request(sock, "POST", url, timeout=ACTION_TIMEOUT_S)
    if not isinstance(body, dict):
        body = {"error": _error_text(body)}
    if loop is not None:
        body = {"loop": loop, **body}
    if 200 <= status < 300:
        code = EXIT_OK if action != "reload" or body.get("ok", True) else EXIT_FAILED
    elif status in (400, 404):
        code = EXIT_USAGE
    elif status == 409:
        code = EXIT_NOT_NOW
    else:
        code = EXIT_FAILED
    return format_result(action, body, ok=code == EXIT_OK), code


def resume_in_ledger(
    state_dir: Path, loop: str, loops: Collection[str] | None = None
) -> tuple[str, int]:
    """`agentd resume LOOP` with no daemon running: clear the pause in the ledger itself.

    The pause lives in the ledger's `loop_state`, so the next `agentd once` or daemon start
    sees it cleared. `loops`: the config's loop names when the config could be read.
    """
    from agentd import loopstate
    from agentd.ledger import DB_NAME, Ledger

    if not LOOP_NAME.match(loop) or (loops is not None and loop not in loops):
        known = "" if loops is None else f" (loops: {', '.join(sorted(loops))})"
        return f"cannot resume {loop}: no loop named {loop!r}{known}", EXIT_USAGE
    path = state_dir / DB_NAME
    if not path.exists():
        return (
            f"{loop} is not paused (no daemon is running and nothing is recorded in {path})",
            EXIT_OK,
        )
    try:
        with Ledger.open(state_dir, create=False, reconcile=False) as ledger:
            was_paused = loopstate.resume(ledger, loop)
    except (LedgerError, sqlite3.Error) as exc:
        raise AgentdError(
            f"no daemon is running and the ledger {path} cannot be written ({exc}); run the "
            "command as the daemon's user (e.g. sudo -u agentd agentd resume LOOP)"
        ) from None
    if was_paused:
        return (
            f"resumed {loop} (no daemon is running: cleared its pause and failure count in "
            f"the ledger {path})",
            EXIT_OK,
        )
    return f"{loop} was not paused (no daemon is running; ledger {path})", EXIT_OK


# ---------------------------------------------------------------------------- formatting


def format_result(action: str, body: Mapping[str, Any], *, ok: bool | None = None) -> str:
    """One line saying what an action did (or why not), from the daemon's JSON answer."""
    succeeded = (not body.get("error") and body.get("ok", True) is not False) if ok is None else ok
    message = body.get("message") or body.get("error")
    loop = body.get("loop") or "?"
    if action == "reload":
        # The daemon's message may already say what happened ("reload refused, …"): no echo.
        said = str(message or "").lower().startswith("reload")
        if succeeded:
            return str(message) if said else f"reloaded: {message or 'configuration reloaded'}"
        if said:
            return str(message)
        return (
            f"reload refused: {message or 'no reason given'}; the old configuration keeps running"
        )
    if not succeeded:
        return f"cannot {action} {loop}: {message or 'the daemon refused'}"
    if message:
        return str(message)
    if action == "trigger":
        run = body.get("run_id")
        return f"triggered {loop}" + (f" (run {run})" if run is not None else "")
    return {"pause": f"paused {loop}", "resume": f"resumed {loop}"}.get(action, f"{action}: ok")


def _error_text(body: Any) -> str:
    if isinstance(body, Mapping):
        return str(body.get("error") or body.get("message") or json.dumps(body))
    return str(body).strip()[:_NOTE_MAX] or "(empty answer)"


def _span(delta: timedelta) -> str:
    """A duration in at most two units: `45s`, `12m`, `3h05m`, `2d04h`."""
    seconds = int(abs(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours == 0:
        return f"{minutes}m"
    if days == 0:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{days}d{hours % 24:02d}h"


def _when(text: Any, now: datetime, tz: tzinfo, relative: bool = True) -> str:
    """A timestamp in the config's zone, as short as today allows, with how far it is from now."""
    if not text:
        return "-"
    try:
        at = parse_iso(str(text))
    except ValueError:
        return str(text)
    local, today = at.astimezone(tz), now.astimezone(tz)
    if local.date() == today.date():
        shown = local.strftime("%H:%M")
    elif local.year == today.year:
        shown = local.strftime("%m-%d %H:%M")
    else:
        shown = local.strftime("%Y-%m-%d %H:%M")
    if not relative:
        return shown
    delta = at - now
    return (
        f"{shown} (in {_span(delta)})"
        if delta.total_seconds() > 0
        else f"{shown} ({_span(delta)} ago)"
    )


def _zone(name: Any) -> tzinfo:
    try:
        return ZoneInfo(str(name))
    except (ValueError, OSError):
        return UTC


def _window_text(window: Mapping[str, Any] | None, loop: str) -> str:
    if not window:
        return "-"
    scope = "loop" if window.get("scope") == loop else str(window.get("scope", "?"))
    return f"{window.get('remaining_usd', '?')} ({scope}/{window.get('period', '?')})"


def _state(loop: Mapping[str, Any]) -> str:
    if loop.get("running"):
        return "running"
    if loop.get("paused"):
        return "paused"
    return "active" if loop.get("enabled", True) else "disabled"


STATUS_COLUMNS = [
    Column("name", "loop"),
    Column("state", "state"),
    Column("schedule", "schedule"),
    Column("next", "next run"),
    Column("last", "last run"),
    Column("result", "result"),
    Column("cost", "cost usd"),
    Column("failures", "fails"),
    Column("today", "today usd"),
    Column("left", "left usd (tightest)"),
]


def format_status(status: Mapping[str, Any]) -> str:
    """`agentd status`: the daemon line, global budgets, one table row per loop, then notes."""
    tz = _zone(status.get("timezone", "UTC"))
    try:
        now = parse_iso(str(status["now"]))
    except (KeyError, ValueError):
        now = datetime.now(UTC)
    loops: list[Mapping[str, Any]] = list(status.get("loops") or [])
    lines = [_daemon_line(status, loops, now, tz)]
    for window in status.get("budgets") or []:
        lines.append(
            f"global budget per {window.get('period')}: {window.get('spent_usd')} of "
            f"{window.get('limit_usd')} USD spent, {window.get('remaining_usd')} left "
            f"(resets {_when(window.get('resets_at'), now, tz, relative=False)})"
        )
    rows, notes = [], []
    for loop in loops:
        name = str(loop.get("name", "?"))
        last = loop.get("last_run") or {}
        rows.append(
            {
                "name": name,
                "state": _state(loop),
                "schedule": loop.get("schedule", "-"),
                "next": "-" if loop.get("paused") else _when(loop.get("next_run"), now, tz),
                "last": _when(last.get("started_at"), now, tz),
                "result": last.get("status", "-"),
                "cost": last.get("cost_usd", "-"),
                "failures": loop.get("consecutive_failures", 0),
                "today": loop.get("spent_today_usd", "-"),
                "left": _window_text(loop.get("tightest"), name),
            }
        )
        if loop.get("paused"):
            notes.append(f"{name}: paused: {loop.get('paused_reason') or 'no reason recorded'}")
        elif loop.get("backoff_until"):
            notes.append(
                f"{name}: backing off after {loop.get('consecutive_failures', '?')} failure(s)"
                f" until {_when(loop['backoff_until'], now, tz)}"
            )
        if last.get("error") and last.get("status") not in ("ok", None):
            notes.append(f"{name}: last run {last.get('status')}: {last['error']}"[:_NOTE_MAX])
    lines.append("")
    lines.append(to_table(rows, STATUS_COLUMNS) if rows else "(no loops configured)")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _daemon_line(
    status: Mapping[str, Any], loops: Sequence[Mapping[str, Any]], now: datetime, tz: tzinfo
) -> str:
    daemon: Mapping[str, Any] = status.get("daemon") or {}
    parts = ["agentd"]
    if daemon.get("version"):
        parts[0] += f" {daemon['version']}"
    if daemon.get("pid"):
        parts.append(f"pid {daemon['pid']}")
    if daemon.get("started_at"):
        with contextlib.suppress(ValueError):
            parts.append(f"up {_span(now - parse_iso(str(daemon['started_at'])))}")
    running = sum(1 for loop in loops if loop.get("running"))
    paused = sum(1 for loop in loops if loop.get("paused"))
    parts.append(f"{len(loops)} loops ({running} running, {paused} paused)")
    if status.get("simulated"):
        parts.append("SIMULATED")
    parts.append(f"times in {status.get('timezone', 'UTC')}")
    if daemon.get("config"):
        parts.append(f"config {daemon['config']}")
    return ", ".join(parts)
