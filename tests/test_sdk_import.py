"""The provider SDKs import off the event loop, once, and only for commands that call a model.

`import anthropic` takes seconds. The tests that need a fresh interpreter (one where no SDK is
imported yet) run a subprocess; the fake server runs here and the SDKs talk to it over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import TEST_ENV, base_config, write_config
from fakeserver import FakeServer

from agentd.providers.errormap import SdkErrors
from agentd.providers.sdkload import SdkClient

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "agent-model-config.yaml"
SDKS = ("anthropic", "openai")

# Three concurrent first calls on one provider while a ticker task runs every 10 ms; prints
# how long the calls took, the longest pause between ticks meanwhile, and the import threads.
FIRST_CALLS = """
import asyncio, json, sys, threading
from agentd.providers import Message, Request, build_provider

api, base_url, model = sys.argv[1:4]
before = sorted({"anthropic", "openai"} & set(sys.modules))

async def main():
    loop = asyncio.get_running_loop()
    ticks, threads, done = [], set(), asyncio.Event()

    async def ticker():
        while not done.is_set():
            ticks.append(loop.time())
            threads.update(t.name for t in threading.enumerate())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    provider = build_provider(api, api, api_key="k", base_url=base_url, timeout_s=30)
    request = Request(model=model, messages=(Message("user", "hi"),), max_tokens=20)
    started = loop.time()
    replies = await asyncio.gather(*(provider.complete(request) for _ in range(3)))
    took = loop.time() - started
    done.set()
    await task
    await provider.aclose()
    during = [t for t in ticks if t >= started] + [started + took]
    gaps = [b - a for a, b in zip([started] + during, during)]
    print(json.dumps({
        "before": before,
        "after": sorted({"anthropic", "openai"} & set(sys.modules)),
        "took": took,
        "max_gap": max(gaps),
        "ticks": len(during) - 1,
        "replies": [r.text for r in replies],
        "import_threads": sorted(n for n in threads if n.startswith("agentd-import-")),
    }))

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("api", SDKS)
def test_a_first_call_imports_its_sdk_without_freezing_the_event_loop(
    fake_server: FakeServer, api: str
) -> None:
    base_url, model = (
        (fake_server.url, "claude-haiku-4-5")
        if api == "anthropic"
        else (f"{fake_server.url}/v1", "gpt-5.4-mini")
    )
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS, api, base_url, model],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"] == [] and out["after"] == [api]
    assert len(out["replies"]) == 3 and all(out["replies"])
    assert fake_server.count(model) == 3
    # The three first calls shared one import thread.
    assert out["import_threads"] == [f"agentd-import-{api}"]
    # The import took most of `took` (it is seconds; the requests are milliseconds), yet the
    # ticker kept ticking: an import on the event loop would be one pause of about `took`.
    assert out["max_gap"] < out["took"] / 3, out
    assert out["ticks"] >= 10, out


IMPORT_TIME = "import time; t = time.perf_counter(); import {sdk}; print(time.perf_counter() - t)"


@pytest.mark.slow
def test_a_first_calls_latency_is_the_request_not_the_sdk_import(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # Relative, not a fixed time: the import's own duration in a fresh interpreter is the
    # yardstick. Were the import inside the timed part, latency_ms would exceed it.
    took = subprocess.run(
        [sys.executable, "-c", IMPORT_TIME.format(sdk="anthropic")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    import_ms = float(took.stdout) * 1000
    config = write_config(tmp_path / "c", base_config(fake_server.url))
    env = {**os.environ, **TEST_ENV}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentd",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "s"),
            "once",
            "work",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(tmp_path / "s" / "ledger.db") as db:
        (latency_ms,) = db.execute("SELECT latency_ms FROM calls").fetchone()
    assert fake_server.count("claude-haiku-4-5") == 1
    assert latency_ms < import_ms / 2, (latency_ms, import_ms)


# Runs one CLI command in this interpreter, then prints which SDKs it imported.
CLI_THEN_MODULES = """
import json, sys
from agentd.cli import main
try:
    main(sys.argv[1:], prog_name="agentd")
except SystemExit as exc:
    code = exc.code
print("RESULT=" + json.dumps({
    "code": code, "sdks": sorted({"anthropic", "openai"} & set(sys.modules))
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["check"],
        ["ledger"],
        ["ledger", "calls"],
        ["budget"],
        ["once", "heartbeat", "--simulate"],
    ],
    ids=lambda c: " ".join(c),
)
def test_commands_that_call_no_model_import_no_sdk(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env = {k: v for k, v in env.items() if not k.startswith(("AGENTD_", "STATE_DIRECTORY"))}
    args = command if command == ["--help"] else ["--config", str(SHIPPED), *command]
    proc = subprocess.run(
        [sys.executable, "-c", CLI_THEN_MODULES, "--state-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    result = json.loads(proc.stdout.splitlines()[-1].removeprefix("RESULT="))
    assert result == {"code": 0, "sdks": []}, proc.stderr


class _Client:
    """A stand-in SDK client: SdkClient only builds and closes it."""

    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


ERRORS = SdkErrors(
    status=ValueError,
    timeout=TimeoutError,
    connection=ConnectionError,
    validation=TypeError,
    base=Exception,
)


def test_concurrent_first_uses_build_one_client_per_event_loop() -> None:
    builds: list[str] = []

    def build(module: object) -> tuple[_Client, SdkErrors]:
        builds.append(getattr(module, "__name__", "?"))
        time.sleep(0.05)  # slow enough for every caller to arrive during the build
        return _Client(), ERRORS

    sdk: SdkClient[_Client] = SdkClient("json", build)

    async def use() -> _Client:
        got = await asyncio.gather(*(sdk.get() for _ in range(5)))
        clients = {id(client) for client, _ in got}
        assert len(clients) == 1 and all(errors is ERRORS for _, errors in got)
        client = got[0][0]
        await sdk.aclose()
        return client

    first = asyncio.run(use())
    second = asyncio.run(use())  # a new event loop gets a client of its own
    assert builds == ["json", "json"]
    assert first is not second and first.closed and second.closed


def test_a_failed_build_is_tried_again() -> None:
    attempts: list[int] = []

    def build(module: object) -> tuple[_Client, SdkErrors]:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first build fails")
        return _Client(), ERRORS

    sdk: SdkClient[_Client] = SdkClient("json", build)

    async def use() -> None:
        with pytest.raises(RuntimeError, match="first build fails"):
            await sdk.get()
        client, _ = await sdk.get()
        assert isinstance(client, _Client)

    asyncio.run(use())
    assert len(attempts) == 2
