"""Python loops: resolving `handler:` references and the context object a handler receives."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from agentd.config import Config
from agentd.errors import ConfigError

Handler = Callable[["LoopContext"], Awaitable[str | None]]

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FUNCTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PURPOSE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_FORM = "package.module:function or path/to/file.py:function"

# Modules loaded from files, by path: (mtime_ns, size, module). A changed file is loaded
# again on the next run, so editing a handler needs no daemon restart.
_file_modules: dict[Path, tuple[int, int, ModuleType]] = {}


class Completer(Protocol):
    """What makes a handler's model calls (the runner's per-run call path)."""

    async def complete(
        self,
        prompt: str,
        *,
        tier: str | None,
        model: str | None,
        max_tokens: int | None,
        purpose: str,
        system: str | None,
    ) -> str:
        """One call through plans, budgets, fallbacks and the ledger; the reply's text."""
        ...


@dataclass(frozen=True)
class LoopContext:
    """What a handler receives: the run's inputs and `complete()` for model calls."""

    loop: str
    config: Config
    now: datetime
    prompt: str | None
    context: dict[str, str]
    last_reply: str | None
    log: Any
    run_id: int
    simulated: bool
    completer: Completer = field(repr=False)

    async def complete(
        self,
        prompt: str,
        *,
        tier: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        purpose: str = "work",
        system: str | None = None,
    ) -> str:
        """Ask a model; defaults are the loop's tier (or model), max_tokens and system prompt.

        Goes through the loop's budget windows and `when_over_budget` plans, the chain's
        fallbacks and the ledger (one `calls` row per attempt, numbered across the run).
        Raises BudgetExceeded when no plan fits, RunFailed/CircuitOpen when every model failed,
        ValueError for an undefined tier or model.
        """
        check_call(self.config, prompt, tier=tier, model=model, max_tokens=max_tokens)
        if not _PURPOSE.match(purpose):
            raise ValueError(f"purpose must be a lower-case word like 'work' (got {purpose!r})")
        return await self.completer.complete(
            prompt, tier=tier, model=model, max_tokens=max_tokens, purpose=purpose, system=system
        )


def check_call(
    config: Config, prompt: str, *, tier: str | None, model: str | None, max_tokens: int | None
) -> None:
    """Refuse a handler call that names what the config does not define."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("complete() needs a non-empty prompt string")
    if tier is not None and model is not None:
        raise ValueError("give tier or model, not both")
    if tier is not None and tier not in config.tiers:
        raise ValueError(f"undefined tier {tier!r} (defined: {', '.join(config.tiers)})")
    if model is not None and model not in config.models:
        raise ValueError(f"undefined model {model!r} (defined: {', '.join(config.models)})")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive integer (got {max_tokens!r})")


def _error(config: Config, loop_name: str, problem: str) -> ConfigError:
    return ConfigError(str(config.path), problem, key_path=f"loops.{loop_name}.handler")


def _load_file(path: Path) -> ModuleType:
    st = path.stat()
    cached = _file_modules.get(path)
    if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2]
    # A name of its own per file: two handler files both called research.py must not collide,
    # and registering it in sys.modules lets dataclasses and pickling inside it work.
    name = "agentd_handler_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _file_modules[path] = (st.st_mtime_ns, st.st_size, module)
    return module


def load_handler(config: Config, loop_name: str) -> Handler:
    """The loop's handler function; a ConfigError (exit 78) says what is wrong with it."""
    reference = config.loops[loop_name].handler
    if reference is None:
        raise _error(config, loop_name, "this loop has no handler")
    target, sep, function = reference.rpartition(":")
    if not sep or not target or not _FUNCTION.match(function):
        raise _error(config, loop_name, f"expected {_FORM} (got {reference!r})")
    is_path = target.endswith(".py") or "/" in target
    try:
        if is_path:
            path = config.resolve_path(target)
            if not path.is_file():
                raise _error(
                    config,
                    loop_name,
                    f"no handler file {path} (relative paths resolve against the config "
                    "file's directory)",
                )
            module = _load_file(path)
            where = str(path)
        else:
            if not _MODULE.match(target):
                raise _error(config, loop_name, f"expected {_FORM} (got {reference!r})")
            module = importlib.import_module(target)
            where = f"module {target}"
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise _error(
            config, loop_name, f"cannot import {target!r}: {exc} (installed? on PYTHONPATH?)"
        ) from None
    except Exception as exc:
        # The handler's own module failed to import: say how, without a traceback.
        raise _error(
            config, loop_name, f"cannot load {target!r}: {type(exc).__name__}: {exc}"
        ) from None
    func = getattr(module, function, None)
    if func is None:
        raise _error(config, loop_name, f"{where} has no function {function!r}")
    if not inspect.iscoroutinefunction(func):
        raise _error(
            config,
            loop_name,
            f"{where}:{function} must be an async function (`async def {function}(ctx)`)",
        )
    handler: Handler = func
    return handler


def check_handler(config: Config, loop_name: str) -> str | None:
    """For `agentd check`: why the loop's handler cannot be loaded, or None (fine, or no handler).

    Loading imports the handler's module, running its top-level code once.
    """
    if config.loops[loop_name].handler is None:
        return None
    try:
        load_handler(config, loop_name)
    except ConfigError as exc:
        return exc.render()
    return None
