"""A loop's context: its sources (files, command output, the last reply) and the filled prompt."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from agentd.config import Config
from agentd.ledger import Ledger
from agentd.logs import get_logger
from agentd.loopconfig import ContextSource

# Names the template always has; a source given one of these names cannot shadow it.
BUILTIN_PLACEHOLDERS = frozenset({"now", "today", "loop", "context"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_GLOB_MAGIC = re.compile(r"[*?\[]")
_STDERR_TAIL_BYTES = 2048
_ERROR_TEXT_CHARS = 300
# After a kill, how long to wait for the process to be reaped before giving up on it.
_REAP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SourceText:
    """One gathered source: the placeholder it fills, a heading for `{context}`, its text."""

    placeholder: str
    title: str
    text: str
    # A file's text is the same from run to run until someone edits it: it may lead the
    # prompt (cacheable prefix). Command output and the last reply change every run.
    stable: bool = False


@dataclass(frozen=True)
class CommandResult:
    """What a command did: its (capped) stdout, and an error text when it failed."""

    stdout: bytes
    truncated: bool
    error: str | None = None
    returncode: int | None = None

    @property
    def ok(self) -> bool:
        """The command ran and exited 0 within its timeout."""
        return self.error is None


# -- text helpers --------------------------------------------------------------------------


def cap_utf8(data: bytes, max_bytes: int) -> str:
    """Decode at most `max_bytes` of UTF-8 without splitting a character; mark any cut."""
    if len(data) <= max_bytes:
        return data.decode("utf-8", errors="replace")
    cut = max_bytes
    # data[cut] is the first byte left out: if it continues a character, that character
    # started inside the kept part, so drop its leading bytes too.
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    kept = data[:cut].decode("utf-8", errors="replace")
    return f"{kept}\n[... truncated at {max_bytes} bytes]"


def _tail(data: bytes, chars: int = _ERROR_TEXT_CHARS) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text if len(text) <= chars else "…" + text[-chars:]


# -- subprocesses (also used by delivery) ----------------------------------------------------


def child_env(config: Config) -> dict[str, str]:
    """The environment for commands agentd starts: ours, minus the providers' API key variables."""
    secret_vars = {p.api_key_env for p in config.providers.values() if p.api_key_env}
    return {k: v for k, v in os.environ.items() if k not in secret_vars}


async def _read_capped(stream: asyncio.StreamReader, max_bytes: int) -> tuple[bytes, bool]:
    """Keep the first `max_bytes` + 1 bytes and drain the rest, so the child never blocks."""
    kept = bytearray()
    more = False
    while chunk := await stream.read(65536):
        room = max_bytes + 1 - len(kept)
        if room > 0:
            kept += chunk[:room]
        if len(chunk) > room:
            more = True
    return bytes(kept), more or len(kept) > max_bytes


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    data = b""
    while chunk := await stream.read(65536):
        data = (data + chunk)[-keep:]
    return data


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The command runs in its own session, so its children (a shell's pipeline) die with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), _REAP_TIMEOUT_S)


async def run_command(
    argv: Sequence[str],
    *,
    cwd: Path,
    timeout_s: float,
    max_bytes: int,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run argv without a shell, in its own process group; kill the group on timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError:
        return CommandResult(b"", False, f"not found: {argv[0]}")
    except OSError as exc:
        return CommandResult(b"", False, f"cannot run {argv[0]}: {exc.strerror or exc}")
    assert proc.stdout is not None and proc.stderr is not None

    async def feed() -> None:
        if proc.stdin is None:
            return
        try:
            if stdin:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read all of its input: its exit status decides
        finally:
            proc.stdin.close()

    try:
        async with asyncio.timeout(timeout_s):
            (out, more), err, _ = await asyncio.gather(
                _read_capped(proc.stdout, max_bytes),
                _read_tail(proc.stderr, _STDERR_TAIL_BYTES),
                feed(),
            )
            returncode = await proc.wait()
    except TimeoutError:
        _kill_group(proc)
        await _reap(proc)
        return CommandResult(b"", False, f"timed out after {timeout_s:g}s")
    except BaseException:
        # Cancelled (daemon shutdown): leave no orphan behind.
        _kill_group(proc)
        raise
    if returncode != 0:
        detail = _tail(err)
        reason = f"exit {returncode}" if returncode > 0 else f"killed by signal {-returncode}"
        return CommandResult(
            out, more, f"{reason}: {detail}" if detail else reason, returncode=returncode
        )
    return CommandResult(out, more, returncode=0)


# -- sources ----------------------------------------------------------------------------------


def last_ok_reply(ledger: Ledger, loop: str, *, simulated: bool = False) -> str | None:
    """The reply of the loop's latest `ok` run (simulated runs only see simulated ones)."""
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT reply FROM runs WHERE loop = ? AND status = 'ok' AND reply IS NOT NULL"
            " AND simulated = ? ORDER BY started_at DESC, id DESC LIMIT 1",
            (loop, int(simulated)),
        ).fetchone()
    return None if row is None else str(row[0])


def _display_path(path: str, base: Path) -> str:
    # Relative to the config directory, as the operator wrote it: stable across installs.
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def matching_files(config: Config, source: ContextSource) -> list[str]:
    """The files a `file:` source names (a path, or a glob sorted by name), resolved."""
    assert source.file is not None
    pattern = str(config.resolve_path(source.file))
    if _GLOB_MAGIC.search(source.file):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return [pattern] if os.path.isfile(pattern) else []


def _read_files(config: Config, source: ContextSource) -> tuple[str, str | None]:
    """The text of a `file:` source and, when something was wrong, a warning."""
    paths = matching_files(config, source)
    if not paths:
        return f"[no file matches {source.file}]", "no file matches"
    buf = bytearray()
    problems: list[str] = []
    limit = source.max_bytes
    for path in paths:
        if len(buf) > limit:
            break  # capped already; later files would only be cut off
        shown = _display_path(path, config.dir)
        if buf and not buf.endswith(b"\n"):
            buf += b"\n"
        buf += f"--- {shown} ---\n".encode()
        try:
            with open(path, "rb") as handle:
                buf += handle.read(max(limit + 1 - len(buf), 0))
        except OSError as exc:
            problems.append(f"{shown}: {exc.strerror or exc}")
            buf += f"[cannot read {shown}: {exc.strerror or exc}]\n".encode()
    return cap_utf8(bytes(buf), limit), "; ".join(problems) or None


async def _file_source(config: Config, source: ContextSource) -> tuple[SourceText, str | None]:
    text, problem = await asyncio.to_thread(_read_files, config, source)
    return SourceText(source.placeholder, f"file {source.file}", text, stable=True), problem


def stable_sources(config: Config, loop_name: str) -> list[SourceText]:
    """The loop's file sources, read now: what `agentd check` and `plan` need for the prefix."""
    return [
        SourceText(s.placeholder, f"file {s.file}", _read_files(config, s)[0], stable=True)
        for s in config.loops[loop_name].context
        if s.kind == "file"
    ]


async def _command_source(config: Config, source: ContextSource, log: Any) -> SourceText:
    assert source.command is not None
    result = await run_command(
        source.command,
        cwd=config.dir,
        timeout_s=source.timeout_s,
        max_bytes=source.max_bytes,
        env=child_env(config),
    )
    text = cap_utf8(result.stdout, source.max_bytes) if result.stdout else ""
    if not result.ok:
        # The model sees that its input is missing rather than silently reasoning without it.
        log.warning("context.command_failed", command=source.command[0], error=result.error)
        text = (text.rstrip("\n") + "\n" if text else "") + f"[command failed: {result.error}]"
    elif not text.strip():
        text = "[command printed nothing]"
    return SourceText(source.placeholder, f"output of {source.command[0]}", text)


def _last_reply_source(source: ContextSource, last_reply: str | None) -> SourceText:
    if last_reply is None:
        text = "[no previous reply]"
    else:
        text = cap_utf8(last_reply.encode(), source.max_bytes)
    return SourceText(source.placeholder, "your previous reply", text)


async def gather_sources(
    config: Config, loop_name: str, *, last_reply: str | None
) -> list[SourceText]:
    """Every context source of the loop, in config order (commands run concurrently)."""
    log = get_logger(loop=loop_name)

    sources = config.loops[loop_name].context

    async def one(source: ContextSource) -> tuple[SourceText, str | None]:
        if source.kind == "file":
            return await _file_source(config, source)
        if source.kind == "command":
            return await _command_source(config, source, log), None
        return _last_reply_source(source, last_reply), None

    results = await asyncio.gather(*(one(s) for s in sources))
    # File problems are logged after the concurrent reads, so the log follows config order.
    for source, (_, problem) in zip(sources, results, strict=True):
        if problem is not None:
            log.warning("context.file_missing", file=source.file, problem=problem)
    return [text for text, _ in results]


def merge_sources(sources: Sequence[SourceText]) -> dict[str, str]:
    """Placeholder → text; sources sharing a placeholder are joined in config order."""
    merged: dict[str, str] = {}
    for source in sources:
        if source.placeholder in merged:
            merged[source.placeholder] += "\n\n" + source.text
        else:
            merged[source.placeholder] = source.text
    return merged


async def gather_context(
    config: Config,
    loop_name: str,
    *,
    state_dir: Path | None = None,
    last_reply: str | None,
    now: datetime | None = None,
) -> dict[str, str]:
    """Placeholder → text for each of the loop's context sources.

    `state_dir` and `now` are accepted for symmetry with delivery; sources resolve against the
    config directory and the time placeholders are filled by `render_template`.
    """
    del state_dir, now
    return merge_sources(await gather_sources(config, loop_name, last_reply=last_reply))


# -- the template ------------------------------------------------------------------------------


def context_block(sources: Sequence[SourceText]) -> str:
    """`{context}`: every source under its own heading."""
    parts = []
    for source in sources:
        named = source.placeholder not in ("file", "command", "last_reply")
        heading = f"{source.placeholder}: {source.title}" if named else source.title
        parts.append(f"## {heading}\n\n{source.text.rstrip()}")
    return "\n\n".join(parts)


def time_values(now: datetime, tz: tzinfo | None) -> dict[str, str]:
    """`{now}` (ISO 8601 to the second) and `{today}` (ISO date), in the config's zone."""
    local = now.astimezone(tz) if tz is not None else now
    return {"now": local.isoformat(timespec="seconds"), "today": local.date().isoformat()}


def render_template(
    template: str,
    *,
    loop: str,
    now: datetime,
    tz: tzinfo | None = None,
    sources: Sequence[SourceText] = (),
) -> str:
    """Fill the template: `{now}`, `{today}`, `{loop}`, each source's placeholder, `{context}`.

    Unknown `{...}` stay as written (prompts hold JSON), and filled-in text is never scanned
    again. A template that uses neither a source placeholder nor `{context}` gets the context
    block appended at its end: stable instructions first, changing context last, which keeps
    the prompt's cacheable prefix the same from run to run.
    """
    merged = merge_sources(sources)
    block = context_block(sources)
    values = {**merged, "context": block, "loop": loop, **time_values(now, tz)}
    used = {m.group(1) for m in _PLACEHOLDER.finditer(template)}
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
    source_names = (set(merged) - BUILTIN_PLACEHOLDERS) | {"context"}
    if sources and not used & source_names:
        text = text.rstrip("\n") + "\n\n# Context\n\n" + block + "\n"
    return text


def stable_prefix(template: str, *, loop: str, sources: Sequence[SourceText] = ()) -> str:
    """The head of the filled template that is the same every run (the prompt-cache prefix).

    It ends before the first placeholder whose value changes between runs (`{now}`, `{today}`,
    `{context}`, a command's output, the last reply); `{loop}`, placeholders filled only by
    files (filled in) and unknown `{...}` are constant. With no changing placeholder it is the
    whole template: the context, if any, is appended after it.
    """
    merged = merge_sources(sources)
    fixed = {p for p in merged if all(s.stable for s in sources if s.placeholder == p)}
    fixed -= set(BUILTIN_PLACEHOLDERS)
    changing = (set(merged) | set(BUILTIN_PLACEHOLDERS)) - fixed - {"loop"}
    end = next(
        (m.start() for m in _PLACEHOLDER.finditer(template) if m.group(1) in changing),
        None,
    )
    head = template.rstrip("\n") if end is None else template[:end]
    values = {**{p: merged[p] for p in fixed}, "loop": loop}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), head)


def check_context(config: Config, loop_name: str) -> list[str]:
    """Warnings about a loop's context sources that `agentd check` may show (names, files)."""
    warnings = []
    for source in config.loops[loop_name].context:
        if source.name in BUILTIN_PLACEHOLDERS:
            warnings.append(
                f"loop {loop_name}: context source name {source.name!r} is taken by the "
                f"built-in {{{source.name}}}; it only shows up in {{context}}"
            )
        if source.kind == "file":
            assert source.file is not None
            pattern = str(config.resolve_path(source.file))
            if not glob.glob(pattern, recursive=True):
                warnings.append(f"loop {loop_name}: context file {source.file!r} matches nothing")
    return warnings
