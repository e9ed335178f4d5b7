"""Alerts: budget levels, pauses and chain failures reach webhook and command sinks."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from builders import TEST_ENV, base_config, merge, write_config
from fakeserver import FakeServer, error, ok

from agentd.alerts import Alerter
from agentd.config import Config, load_config
from agentd.dispatch import Dispatcher
from agentd.ledger import Ledger
from agentd.runner import run_once


class Sink:
    """A webhook on 127.0.0.1 that keeps the JSON bodies it receives."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                sink.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["event"] == name]


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    s.thread.start()
    yield s
    s.server.shutdown()
    s.server.server_close()


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)


def make_config(tmp_path: Path, server: FakeServer, patch: dict[str, Any]) -> Config:
    data = merge(base_config(server.url), patch)
    return load_config(write_config(tmp_path / "conf", data))


def test_budget_80_and_100_percent(tmp_path: Path, fake_server: FakeServer, sink: Sink) -> None:
    config = make_config(
        tmp_path,
        fake_server,
        {
            "alerts": {"sinks": [{"webhook": sink.url, "timeout_s": 5}]},
            "loops": {"work": {"max_tokens": 20, "budget": {"per_day_usd": 0.001}}},
        },
    )
    state = tmp_path / "state"
    # 200 input × $1 + 159 output × $5 per MTok = 995 micro-USD: 99.5 % of the day's 1000.
    fake_server.script("claude-haiku-4-5", ok(input_tokens=200, output_tokens=159))
    first = asyncio.run(run_once(config, state, "work"))
    assert first.status == "ok" and first.cost_micro_usd == 995
    [eighty] = sink.events("budget_threshold")
    assert eighty["level_pct"] == 80 and eighty["refused"] is False
    assert eighty["used_pct"] == "99.5" and "asked_usd" not in eighty
    assert eighty["window"] == "loop work per day"
    assert (eighty["limit_usd"], eighty["used_usd"]) == ("0.001000", "0.000995")
    assert eighty["run_id"] == first.run_id
    # The next call's worst case does not fit in what is left on either model: refused, and
    # that is 100 %, told apart from spend reaching the limit by `refused` and `asked_usd`.
    second = asyncio.run(run_once(config, state, "work"))
    assert second.status == "skipped_budget"
    levels = [e["level_pct"] for e in sink.events("budget_threshold")]
    assert levels == [80, 100]
    hundred = sink.events("budget_threshold")[1]
    assert hundred["window_start"] == eighty["window_start"]
    assert hundred["refused"] is True and hundred["used_pct"] == "99.5"
    # The cheaper refused call, gpt-4o-mini: 42 input tokens × $0.15 + 20 × $0.60 per MTok
    # = 18.3 → 19 micro-USD, more than the 5 left.
    assert hundred["asked_usd"] == "0.000019"
    assert hundred["note"] == (
        f"a call asking up to {hundred['asked_usd']} USD did not fit in the 0.000005 USD left"
    )
    assert fake_server.count() == 1
    # No secret in any body.
    dump = json.dumps(sink.bodies)
    assert TEST_ENV["TEST_ANTHROPIC_KEY"] not in dump and sink.url not in dump


def _budget_too_small(tmp_path: Path, fake_server: FakeServer, sink: Sink) -> Config:
    """A loop whose 0.001 USD day budget no call of 2,000 max_tokens fits, alerting `sink`."""
    return make_config(
        tmp_path,
        fake_server,
        {
            "alerts": {"sinks": [{"webhook": sink.url, "timeout_s": 5}]},
            "loops": {"work": {"max_tokens": 2000, "budget": {"per_day_usd": 0.001}}},
        },
    )


def test_a_refusal_far_below_the_limit_says_so(
    tmp_path: Path, fake_server: FakeServer, sink: Sink
) -> None:
    config = _budget_too_small(tmp_path, fake_server, sink)
    result = asyncio.run(run_once(config, tmp_path / "state", "work"))
    assert result.status == "skipped_budget" and fake_server.count() == 0
    [event] = sink.events("budget_threshold")
    assert event["level_pct"] == 100 and event["refused"] is True
    assert (event["used_usd"], event["used_pct"]) == ("0.000000", "0.0")
    # The cheaper refusal, gpt-4o-mini: 2000 output tokens at $0.60 per MTok = 1200 micro-USD,
    # plus the 10-byte prompt's input bound of 42 tokens at $0.15 per MTok = 6.3 → 1207.
    assert event["asked_usd"] == "0.001207"


def test_a_refusal_alert_reads_the_refusals_numbers_not_their_messages(
    tmp_path: Path, fake_server: FakeServer, sink: Sink
) -> None:
    config = _budget_too_small(tmp_path, fake_server, sink)
    state = tmp_path / "state"
    result = asyncio.run(run_once(config, state, "work"))
    assert result.status == "skipped_budget" and len(result.window_refusals) == 2
    [first] = sink.events("budget_threshold")
    # The same run with every refusal reworded and no refusal text left in its route or error:
    # a fresh alerter (nothing sent yet) must send the very same event.
    for refusal in result.window_refusals:
        refusal.args = ("no room today",)
    reworded = replace(result, error="no room today", route={})
    sink.bodies.clear()

    async def go() -> None:
        with Ledger.open(state) as ledger:
            alerter = Alerter(config, state)
            alerter.after_run(ledger, reworded)
            await alerter.drain(10)

    asyncio.run(go())
    [again] = sink.events("budget_threshold")
    assert again["refused"] is True and again["asked_usd"] == "0.001207"
    assert {k: v for k, v in again.items() if k != "at"} == {
        k: v for k, v in first.items() if k != "at"
    }


def test_pause_and_chain_failure_in_the_daemon(
    tmp_path: Path, fake_server: FakeServer, sink: Sink
) -> None:
    config = make_config(
        tmp_path,
        fake_server,
        {
            "alerts": {"sinks": [{"webhook": sink.url}]},
            "loops": {"work": {"on_failure": {"pause_after": 1}}},
        },
    )
    fake_server.script("claude-haiku-4-5", error(400))
    fake_server.script("gpt-4o-mini", error(400))

    async def go() -> None:
        with Ledger.open(tmp_path / "state") as ledger:
            dispatch = Dispatcher(config, ledger, simulate=False)
            assert dispatch.spawn("work", "manual", None)
            while dispatch.active:
                await asyncio.sleep(0.02)
            await dispatch.alerter.drain(10)
            await dispatch.close()

    asyncio.run(go())
    [chain] = sink.events("chain_failed")
    assert chain["loop"] == "work" and "every model failed" in chain["error"]
    [paused] = sink.events("loop_paused")
    assert paused["loop"] == "work" and paused["run_id"] == chain["run_id"]
    assert paused["reason"].startswith("1 consecutive failures")


def test_rate_limit_per_key(tmp_path: Path, fake_server: FakeServer, sink: Sink) -> None:
    config = make_config(
        tmp_path,
        fake_server,
        {"alerts": {"sinks": [{"webhook": sink.url}], "min_interval_s": 60}},
    )
    now = [1000.0]
    alerter = Alerter(config, tmp_path, clock=lambda: now[0])

    async def go() -> list[bool]:
        sent = [alerter.emit("test", "k1"), alerter.emit("test", "k1"), alerter.emit("test", "k2")]
        now[0] += 61
        sent.append(alerter.emit("test", "k1"))
        await alerter.drain(10)
        return sent

    assert asyncio.run(go()) == [True, False, True, True]
    assert [b["key"] for b in sink.bodies if b["event"] == "test"].count("k1") == 2


def test_command_sink_gets_json_on_stdin(tmp_path: Path, fake_server: FakeServer) -> None:
    out = tmp_path / "alert.json"
    code = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    config = make_config(
        tmp_path, fake_server, {"alerts": {"sinks": [{"command": [sys.executable, "-c", code]}]}}
    )
    alerter = Alerter(config, tmp_path / "state")

    async def go() -> None:
        alerter.loop_paused("work", "anomaly: run 7 cost ...", 7)
        await alerter.drain(10)

    asyncio.run(go())
    body = json.loads(out.read_text())
    assert body["event"] == "loop_paused" and body["run_id"] == 7 and body["loop"] == "work"


def test_a_dead_sink_never_fails_the_run(tmp_path: Path, fake_server: FakeServer) -> None:
    config = make_config(
        tmp_path,
        fake_server,
        {
            "alerts": {"sinks": [{"webhook": "http://127.0.0.1:9/x", "timeout_s": 1}]},
            "loops": {"work": {"max_tokens": 20, "budget": {"per_day_usd": 0.001}}},
        },
    )
    fake_server.script("claude-haiku-4-5", ok(input_tokens=200, output_tokens=150))
    assert asyncio.run(run_once(config, tmp_path / "state", "work")).status == "ok"
