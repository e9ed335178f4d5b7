"""Structured logging: structlog events on stderr, JSON when stderr is not a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import structlog

_configured = False


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Send structlog events to stderr (stdout stays for command output); JSON unless a TTY."""
    global _configured
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
    _configured = True


class _StderrProxy:
    """A file-like object that always writes to the current `sys.stderr`."""

    def write(self, text: str) -> int:
        """Write to the current stderr."""
        return sys.stderr.write(text)

    def flush(self) -> None:
        """Flush the current stderr."""
        sys.stderr.flush()


def get_logger(**bound: Any) -> Any:
    """A structlog logger with optional bound context."""
    return structlog.get_logger("agentd").bind(**bound)
