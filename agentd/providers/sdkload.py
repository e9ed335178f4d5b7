"""Provider SDKs imported off the event loop, once per process, and clients built per loop.

`import anthropic` takes one to four seconds. Done inside a coroutine it freezes the event
loop for that long: the daemon would not answer signals, its control socket or the watchdog,
and the first call's latency would include the import. So the import runs in a thread of its
own (concurrent first callers share it) and the client is built in a worker thread.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import ModuleType
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from agentd.errors import MissingKeyError
from agentd.eventloop import running_loop
from agentd.providers.errormap import SdkErrors

if TYPE_CHECKING:
    from agentd.config import Config

# The module each provider `type` needs (simulated needs none).
SDK_MODULES = {"anthropic": "anthropic", "openai": "openai"}

_lock = threading.Lock()
_imports: dict[str, Future[ModuleType]] = {}


class _Client(Protocol):
    async def close(self) -> None: ...


ClientT = TypeVar("ClientT", bound=_Client)


def start_import(module: str) -> Future[ModuleType]:
    """Begin importing `module` in a thread (once per process); the future of the module."""
    with _lock:
        future = _imports.get(module)
        if future is None:
            future = Future()
            # Running from the start: a waiter's cancellation (asyncio.wrap_future cancels its
            # source) must not cancel the import the other waiters share.
            future.set_running_or_notify_cancel()
            _imports[module] = future
            # Not a daemon thread: an interpreter finalizing under a half-done import can crash.
            thread = threading.Thread(
                target=_import, args=(module, future), name=f"agentd-import-{module}"
            )
            thread.start()
    return future


def warm_up(config: Config, env: Mapping[str, str]) -> dict[str, Future[ModuleType]]:
    """Start importing the SDKs of the config's providers that have a key (the daemon's warm-up).

    A provider without its key is left out: a call to it fails on the missing key first.
    """
    types = set()
    for name, provider in config.providers.items():
        try:
            config.api_key(name, env)
        except MissingKeyError:
            continue
        types.add(provider.type)
    modules = sorted({SDK_MODULES[t] for t in types if t in SDK_MODULES})
    return {module: start_import(module) for module in modules}


async def wait_imports(imports: Mapping[str, Future[ModuleType]]) -> dict[str, str]:
    """Wait for imports `warm_up` started; the ones that failed, with their error."""
    failed: dict[str, str] = {}
    for module, future in imports.items():
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:
            failed[module] = f"{type(exc).__name__}: {exc}"
    return failed


def _import(module: str, future: Future[ModuleType]) -> None:
    try:
        loaded = importlib.import_module(module)
    except BaseException as exc:
        with _lock:
            _imports.pop(module, None)  # a later caller tries again
        future.set_exception(exc)
    else:
        future.set_result(loaded)


async def load_sdk(module: str) -> ModuleType:
    """The SDK module, imported off the event loop; concurrent first callers share one import."""
    future = start_import(module)
    if future.done():
        return future.result()
    return await asyncio.wrap_future(future)


class SdkClient(Generic[ClientT]):
    """A provider's SDK client, built off the event loop on first use and again per event loop.

    An async HTTP client is bound to the loop it first ran in; a caller that makes calls from
    successive `asyncio.run()`s gets a fresh client instead of "Event loop is closed".
    """

    def __init__(self, module: str, build: Callable[[ModuleType], tuple[ClientT, SdkErrors]]):
        self._module = module
        self._build = build
        self._built: tuple[ClientT, SdkErrors] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._building: asyncio.Task[tuple[ClientT, SdkErrors]] | None = None

    @property
    def built(self) -> tuple[ClientT, SdkErrors] | None:
        """The client and its error classes if built (for any event loop), else None."""
        return self._built

    async def get(self) -> tuple[ClientT, SdkErrors]:
        """The client for the running event loop and the SDK's error classes."""
        loop = asyncio.get_running_loop()
        if self._built is not None and self._loop is loop:
            return self._built
        task = self._building
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._create(loop))
            task.add_done_callback(_retrieve)
            self._building = task
        # Shielded: a caller cancelled while waiting leaves the build to the other callers.
        return await asyncio.shield(task)

    async def _create(self, loop: asyncio.AbstractEventLoop) -> tuple[ClientT, SdkErrors]:
        try:
            sdk = await load_sdk(self._module)
            built = await asyncio.to_thread(self._build, sdk)
        finally:
            if self._building is asyncio.current_task():
                self._building = None  # a failed build is tried again by the next caller
        self._built, self._loop = built, loop
        return built

    async def aclose(self) -> None:
        """Close the client, if one was built in the running event loop."""
        built, self._built = self._built, None
        if built is not None and self._loop is running_loop():
            await built[0].close()


def _retrieve(task: asyncio.Task[object]) -> None:
    """Mark a build's failure as seen: its callers got it, or were cancelled meanwhile."""
    if not task.cancelled():
        task.exception()
