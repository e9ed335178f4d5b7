"""Where a loop's reply goes: a file, a command's stdin, a webhook; quiet replies and on_reply."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from agentd import __version__
from agentd.config import Config
from agentd.context import child_env, run_command
from agentd.ledger import now_iso
from agentd.logs import get_logger
from agentd.loopconfig import Delivery, LoopConfig
from agentd.pricing import format_usd

_ERROR_CHARS = 300
# Path segments this long are treated as tokens (Slack, Discord and similar webhooks carry
# their secret in the path), so they never reach the logs or the ledger.
_TOKEN_SEGMENT = re.compile(r"^[^/]{20,}$")


@dataclass(frozen=True)
class DeliveryOutcome:
    """One delivery of a reply: what kind, where (redacted), and whether it worked."""

    kind: Literal["file", "command", "webhook"]
    target: str
    ok: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON recorded in the run's `route` under `deliveries`."""
        return asdict(self)


def is_quiet(loop: LoopConfig, reply: str | None) -> bool:
    """A reply carrying the loop's quiet token is recorded but not delivered."""
    token = loop.quiet_token
    return bool(token) and reply is not None and token is not None and token in reply


def wake_for(loop: LoopConfig, reply: str | None) -> str | None:
    """The loop that `on_reply` wakes for this reply, if any."""
    if loop.on_reply is None or reply is None:
        return None
    return loop.on_reply.trigger if loop.on_reply.contains in reply else None


def redact_url(url: str) -> str:
    """A URL safe to log: no userinfo, query or fragment, and token-like path segments hidden."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    path = "/".join("***" if _TOKEN_SEGMENT.match(s) else s for s in parts.path.split("/"))
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


def _scrub(text: str, url: str) -> str:
    """Remove every secret-bearing piece of `url` from an error text, then shorten it."""
    parts = urllib.parse.urlsplit(url)
    secrets = [url, parts.query, parts.password or "", parts.username or "", parts.fragment]
    secrets += [s for s in parts.path.split("/") if _TOKEN_SEGMENT.match(s)]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text[:_ERROR_CHARS]


def state_path(state_dir: Path, path: str) -> Path:
    """A path named in a `deliver:` entry, resolved against the state directory."""
    return state_dir / Path(path).expanduser()


# -- the three kinds ---------------------------------------------------------------------------


def _append(path: Path, data: bytes) -> None:
    # 0700 parents / 0600 file whatever the umask: replies may hold private information.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # One write on an O_APPEND descriptor: concurrent appenders never interleave inside it.
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


async def _to_file(
    state_dir: Path, target: str, loop: str, run_id: int, reply: str
) -> DeliveryOutcome:
    path = state_path(state_dir, target)
    header = f"--- {now_iso()} loop {loop} run {run_id} ---\n"
    body = reply if reply.endswith("\n") else reply + "\n"
    try:
        await asyncio.to_thread(_append, path, (header + body + "\n").encode())
    except OSError as exc:
        return DeliveryOutcome("file", str(path), False, f"{exc.strerror or exc}")
    return DeliveryOutcome("file", str(path), True)


async def send_to_command(
    config: Config, state_dir: Path, delivery: Delivery, reply: str
) -> DeliveryOutcome:
    assert delivery.command is not None
    argv = list(delivery.command)
    # A relative script path (`../loops/notify.sh`) is a config path; the command runs in the
    # state directory, the one place agentd may write to under systemd.
    if "/" in argv[0] and not os.path.isabs(argv[0]):
        argv[0] = str(config.resolve_path(argv[0]))
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    result = await run_command(
        argv,
        cwd=state_dir,
        timeout_s=delivery.timeout_s,
        max_bytes=4096,
        stdin=reply.encode(),
        env=child_env(config),
    )
    return DeliveryOutcome("command", delivery.command[0], result.ok, result.error)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would be re-sent as a GET without its body: report it instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(url: str, body: bytes, timeout_s: float) -> int:
    """POST JSON; return the status (urllib raises HTTPError for 4xx/5xx)."""
    parts = urllib.parse.urlsplit(url)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"agentd/{__version__}",
    }
    if parts.username is not None:
        # urllib does not take credentials from the URL itself: send them as Basic auth.
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    with opener.open(request, timeout=timeout_s) as response:
        response.read(65536)
        return int(response.status)


async def post_to_webhook(delivery: Delivery, payload: Mapping[str, Any]) -> DeliveryOutcome:
    assert delivery.webhook is not None
    url = delivery.webhook
    target = redact_url(url)
    body = json.dumps(payload).encode()
    try:
        # The socket timeout covers each read; this one covers the whole exchange. A thread
        # left behind by it ends at the socket timeout at the latest.
        status = await asyncio.wait_for(
            asyncio.to_thread(_post, url, body, delivery.timeout_s), delivery.timeout_s
        )
    except urllib.error.HTTPError as exc:
        return DeliveryOutcome("webhook", target, False, f"HTTP {exc.code}")
    except TimeoutError:
        return DeliveryOutcome("webhook", target, False, f"timed out after {delivery.timeout_s:g}s")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return DeliveryOutcome("webhook", target, False, _scrub(str(reason), url))
    if not 200 <= status < 300:
        return DeliveryOutcome("webhook", target, False, f"HTTP {status}")
    return DeliveryOutcome("webhook", target, True)


# -- the entry point ---------------------------------------------------------------------------


async def _one(
    config: Config,
    loop_name: str,
    delivery: Delivery,
    reply: str,
    state_dir: Path,
    run_id: int,
    payload: Mapping[str, Any],
) -> DeliveryOutcome:
    if delivery.file is not None:
        return await _to_file(state_dir, delivery.file, loop_name, run_id, reply)
    if delivery.command is not None:
        return await send_to_command(config, state_dir, delivery, reply)
    return await post_to_webhook(delivery, payload)


async def deliver(
    config: Config,
    loop_name: str,
    result_reply: str,
    *,
    state_dir: Path,
    run_id: int,
    meta: Mapping[str, Any],
) -> list[DeliveryOutcome]:
    """Send a reply to every `deliver:` target of the loop, concurrently; never raises for one.

    `meta` supplies the webhook's `model`, `cost_usd` (a decimal string) and `finished_at`.
    Failures are logged (`delivery.failed`) and returned, not raised: the reply is already
    paid for and recorded, so a dead webhook must not turn the run into a failure.
    """
    loop = config.loops[loop_name]
    log = get_logger(loop=loop_name, run_id=run_id)
    payload = {
        "loop": loop_name,
        "run_id": run_id,
        "reply": result_reply,
        "model": meta.get("model"),
        "cost_usd": meta.get("cost_usd"),
        "finished_at": meta.get("finished_at") or now_iso(),
    }
    outcomes: list[DeliveryOutcome] = []
    results = await asyncio.gather(
        *(
            _one(config, loop_name, d, result_reply, state_dir, run_id, payload)
            for d in loop.deliver
        ),
        return_exceptions=True,
    )
    for delivery, result in zip(loop.deliver, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # cancellation and friends are not delivery failures
            kind: Literal["file", "command", "webhook"] = (
                "file" if delivery.file else "command" if delivery.command else "webhook"
            )
            target = (
                delivery.file
                or (delivery.command[0] if delivery.command else None)
                or redact_url(delivery.webhook or "")
            )
            message = f"{type(result).__name__}: {result}"
            if delivery.webhook:
                message = _scrub(message, delivery.webhook)
            result = DeliveryOutcome(kind, target, False, message[:_ERROR_CHARS])
        outcomes.append(result)
        if result.ok:
            log.info("delivery.ok", kind=result.kind, target=result.target)
        else:
            log.warning(
                "delivery.failed", kind=result.kind, target=result.target, error=result.error
            )
    return outcomes


async def deliver_reply(
    config: Config,
    loop_name: str,
    reply: str | None,
    *,
    state_dir: Path,
    run_id: int,
    model: str | None,
    cost_micro_usd: int,
) -> dict[str, Any]:
    """After an ok run: deliver its reply unless quiet; the notes for the run's `route`."""
    loop = config.loops[loop_name]
    if reply is None or not reply.strip():
        return {}
    if is_quiet(loop, reply):
        get_logger().info("run.quiet", loop=loop_name, run_id=run_id)
        return {"quiet": True}
    if not loop.deliver:
        return {}
    meta = {"model": model, "cost_usd": format_usd(cost_micro_usd), "finished_at": now_iso()}
    outcomes = await deliver(
        config, loop_name, reply, state_dir=state_dir, run_id=run_id, meta=meta
    )
    return {"deliveries": [o.as_dict() for o in outcomes]}
