"""Structured logging: structlog events on stderr, JSON when stderr is not a terminal.

structlog (and asyncio, which it imports) is loaded with the first event, not at start-up:
a read-only command such as `agentd ledger` usually logs nothing and should not pay ~45 ms
of imports for it. `configure_logging` only records the settings until then.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

# (level, json) asked for by `configure_logging`, applied when structlog is first needed.
_settings: tuple[str, bool | None] | None = None
_applied = False


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Send structlog events to stderr (stdout stays for command output); JSON unless a TTY."""
    global _settings, _applied
    _settings, _applied = (level, json), False
    if "structlog" in sys.modules:  # already loaded: nothing to save by waiting
        _apply()


def _apply() -> None:
    global _applied
    _applied = True
    if _settings is None:
        return
    import structlog

    level, json = _settings
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # Resolve stderr at write time, so tests that capture it see the events.
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _StderrProxy())),
        cache_logger_on_first_use=False,
    )


class _StderrProxy:
    """A file-like object that always writes to the current `sys.stderr`."""

    def write(self, text: str) -> int:
        """Write to the current stderr."""
        return sys.stderr.write(text)

    def flush(self) -> None:
        """Flush the current stderr."""
        sys.stderr.flush()


class _Logger:
    """A logger with bound context that loads structlog only when an event is logged.

    Resolved again at every event (like structlog's own lazy loggers), so a configuration
    made later — `configure_logging`, or a test's `capture_logs` — applies to it.
    """

    __slots__ = ("_bound",)

    def __init__(self, bound: dict[str, Any]) -> None:
        self._bound = bound

    def bind(self, **more: Any) -> _Logger:
        """The same logger with more context bound."""
        return _Logger({**self._bound, **more})

    def __getattr__(self, name: str) -> Any:
        if not _applied:
            _apply()
        import structlog

        return getattr(structlog.get_logger("agentd").bind(**self._bound), name)


def get_logger(**bound: Any) -> Any:
    """A structlog logger with optional bound context (structlog is loaded at its first event)."""
    return _Logger(bound)


def bind_contextvars(**values: Any) -> None:
    """Bind context to every event of this task (structlog.contextvars)."""
    import structlog

    structlog.contextvars.bind_contextvars(**values)


def unbind_contextvars(*keys: str) -> None:
    """Undo `bind_contextvars` for these keys."""
    import structlog

    structlog.contextvars.unbind_contextvars(*keys)
