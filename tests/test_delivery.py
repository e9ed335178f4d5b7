"""Deliveries of replies: file, command stdin, webhook; failures recorded, quiet token, on_reply."""

from __future__ import annotations

import base64
import json
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog
from fakeserver import FakeServer, ok
from test_executor import Harness

from agentd.delivery import redact_url
from agentd.views import once_result_json, once_result_text

PY = sys.executable


@dataclass
class Hook:
    """A webhook receiver on 127.0.0.1: records POSTs, answers `status` after `delay` seconds."""

    status: int = 200
    delay: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            state.received.append(
                {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
            )
            time.sleep(state.delay)
            self.send_response(state.status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that timed out and hung up is what some tests want

    server = Server(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def harness(
    tmp_path: Path, server: FakeServer, deliver: list[dict[str, Any]], **loop: Any
) -> Harness:
    return Harness(tmp_path, server, {"loops": {"work": {"deliver": deliver, **loop}}})


def state_dir(h: Harness) -> Path:
    return h.ledger.path.parent


def test_file_delivery_appends_under_the_state_dir_with_mode_0600(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = harness(tmp_path, fake_server, [{"file": "replies/work.log"}])
    fake_server.script("claude-haiku-4-5", ok("first reply"), ok("second reply"))
    first, second = h.run(), h.run()
    path = state_dir(h) / "replies" / "work.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert f" loop work run {first.run_id} ---\nfirst reply\n\n" in text
    assert text.index("first reply") < text.index(f"run {second.run_id} ---\nsecond reply")
    assert not (h.config.dir / "replies").exists()  # never beside the (read-only) config
    assert first.route["deliveries"] == [
        {"kind": "file", "target": str(path), "ok": True, "error": None}
    ]
    assert h.run_row(first.run_id)["route"]["deliveries"][0]["ok"] is True


def test_command_delivery_gets_the_reply_on_stdin(tmp_path: Path, fake_server: FakeServer) -> None:
    out = tmp_path / "got.txt"
    script = "import sys, os; open(sys.argv[1], 'w').write(os.getcwd() + '|' + sys.stdin.read())"
    h = harness(tmp_path, fake_server, [{"command": [PY, "-c", script, str(out)]}])
    fake_server.script("claude-haiku-4-5", ok("piped reply"))
    result = h.run()
    assert result.status == "ok"
    assert out.read_text() == f"{state_dir(h)}|piped reply"
    assert result.route["deliveries"] == [
        {"kind": "command", "target": PY, "ok": True, "error": None}
    ]


def test_a_failed_delivery_is_recorded_and_does_not_fail_the_run(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    script = "import sys; sys.stdin.read(); sys.stderr.write('no route to pager'); sys.exit(3)"
    h = harness(
        tmp_path,
        fake_server,
        [{"command": [PY, "-c", script]}, {"file": "replies/ok.log"}],
    )
    fake_server.script("claude-haiku-4-5", ok("important"))
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    assert result.status == "ok" and result.exit_code == 0
    assert result.reply == "important"
    failed, fine = h.run_row(result.run_id)["route"]["deliveries"]
    assert failed == {
        "kind": "command",
        "target": PY,
        "ok": False,
        "error": "exit 3: no route to pager",
    }
    assert fine["ok"] is True  # one broken target does not stop the others
    [event] = [e for e in logs if e["event"] == "delivery.failed"]
    assert event["kind"] == "command" and event["error"] == "exit 3: no route to pager"


def test_command_delivery_timeout_and_missing_command(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = harness(
        tmp_path,
        fake_server,
        [
            {"command": ["sleep", "30"], "timeout_s": 0.3},
            {"command": ["agentd-no-such-notifier"]},
        ],
    )
    started = time.monotonic()
    result = h.run()
    assert time.monotonic() - started < 10
    assert result.status == "ok"
    slow, missing = result.route["deliveries"]
    assert slow["error"] == "timed out after 0.3s"
    assert missing["error"] == "not found: agentd-no-such-notifier"


def test_webhook_posts_json(tmp_path: Path, fake_server: FakeServer, hook: Hook) -> None:
    h = harness(tmp_path, fake_server, [{"webhook": f"{hook.url}/agentd"}])
    fake_server.script("claude-haiku-4-5", ok("hook me", input_tokens=1000, output_tokens=200))
    result = h.run()
    [request] = hook.received
    assert request["path"] == "/agentd"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]
    assert set(body) == {"loop", "run_id", "reply", "model", "cost_usd", "finished_at"}
    assert (body["loop"], body["run_id"], body["reply"]) == ("work", result.run_id, "hook me")
    assert body["model"] == "claude-haiku-4-5"
    assert isinstance(body["cost_usd"], str) and Decimal(body["cost_usd"]) == Decimal("0.002")
    assert body["finished_at"].endswith("Z")
    assert result.route["deliveries"][0]["ok"] is True


def test_webhook_non_2xx_is_a_failed_delivery(
    tmp_path: Path, fake_server: FakeServer, hook: Hook
) -> None:
    hook.status = 503
    h = harness(tmp_path, fake_server, [{"webhook": hook.url + "/x"}])
    result = h.run()
    assert result.status == "ok"
    assert result.route["deliveries"] == [
        {"kind": "webhook", "target": hook.url + "/x", "ok": False, "error": "HTTP 503"}
    ]


def test_webhook_redirect_is_not_followed(
    tmp_path: Path, fake_server: FakeServer, hook: Hook
) -> None:
    hook.status = 302  # urllib would re-send a redirected POST as a GET without its body
    h = harness(tmp_path, fake_server, [{"webhook": hook.url}])
    [delivery] = h.run().route["deliveries"]
    assert delivery["ok"] is False and delivery["error"] == "HTTP 302"


def test_webhook_timeout(tmp_path: Path, fake_server: FakeServer, hook: Hook) -> None:
    hook.delay = 10
    h = harness(tmp_path, fake_server, [{"webhook": hook.url, "timeout_s": 0.3}])
    started = time.monotonic()
    result = h.run()
    assert time.monotonic() - started < 8  # far below the receiver's 10 s
    assert result.status == "ok"
    [delivery] = result.route["deliveries"]
    assert delivery["ok"] is False and "timed out" in delivery["error"]


def test_webhook_credentials_never_reach_logs_or_ledger(
    tmp_path: Path, fake_server: FakeServer, hook: Hook
) -> None:
    hook.status = 500
    host = hook.url.removeprefix("http://")
    url = f"http://alice:pw-s3cret@{host}/hook?token=qs-s3cret#frag"
    h = harness(tmp_path, fake_server, [{"webhook": url}])
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    # The credentials went to the receiver as Basic auth, and nowhere else.
    auth = hook.received[0]["headers"]["Authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")).decode() == "alice:pw-s3cret"
    assert hook.received[0]["path"] == "/hook?token=qs-s3cret"
    [delivery] = result.route["deliveries"]
    assert delivery["target"] == f"http://{host}/hook"
    dump = "\n".join(h.ledger.conn.iterdump())
    assert "s3cret" not in dump and "s3cret" not in repr(logs)


def test_unreachable_webhook_error_is_scrubbed(tmp_path: Path, fake_server: FakeServer) -> None:
    url = "http://127.0.0.1:9/hook?key=s3cret"  # the discard port: nothing listens
    h = harness(tmp_path, fake_server, [{"webhook": url, "timeout_s": 2}])
    [delivery] = h.run().route["deliveries"]
    assert delivery["ok"] is False and delivery["target"] == "http://127.0.0.1:9/hook"
    assert "s3cret" not in json.dumps(delivery)


def test_redact_url_hides_userinfo_query_and_token_paths() -> None:
    assert redact_url("https://u:p@example.com:8443/a/b?x=1#y") == "https://example.com:8443/a/b"
    slack = "https://hooks.slack.com/services/T0000000/B0000000/XXXXXXXXXXXXXXXXXXXXXXXX"
    assert redact_url(slack) == "https://hooks.slack.com/services/T0000000/B0000000/***"


def test_quiet_token_records_but_does_not_deliver(tmp_path: Path, fake_server: FakeServer) -> None:
    h = harness(tmp_path, fake_server, [{"file": "replies/work.log"}], quiet_token="ALL_OK")
    fake_server.script("claude-haiku-4-5", ok("ALL_OK"), ok("something is wrong"))
    quiet = h.run()
    assert quiet.status == "ok" and quiet.reply == "ALL_OK"
    assert h.run_row(quiet.run_id)["reply"] == "ALL_OK"
    assert h.run_row(quiet.run_id)["route"]["quiet"] is True
    assert "deliveries" not in quiet.route
    log = state_dir(h) / "replies" / "work.log"
    assert not log.exists()
    loud = h.run()
    assert "quiet" not in loud.route
    assert "something is wrong" in log.read_text()


def test_on_reply_names_the_loop_to_wake(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "loops": {
                "work": {"on_reply": {"contains": "NEEDS_RESEARCH", "trigger": "research"}},
                "research": {
                    "every": "2h",
                    "tier": "balanced",
                    "max_tokens": 100,
                    "prompt": "research.md",
                },
            }
        },
    )
    fake_server.script("claude-haiku-4-5", ok("all fine"), ok("disk full NEEDS_RESEARCH: why?"))
    calm = h.run()
    assert calm.wake is None
    assert "-- would wake" not in once_result_text(calm)
    assert json.loads(once_result_json(calm))["wake"] is None
    woken = h.run()
    assert woken.wake == "research"
    assert woken.route["wake"] == "research"
    assert h.run_row(woken.run_id)["route"]["wake"] == "research"
    assert once_result_text(woken).endswith("-- would wake research (on_reply)")
    assert json.loads(once_result_json(woken))["wake"] == "research"


def test_nothing_is_delivered_for_a_failed_run(tmp_path: Path, fake_server: FakeServer) -> None:
    from fakeserver import error

    h = harness(tmp_path, fake_server, [{"file": "replies/work.log"}])
    fake_server.script("claude-haiku-4-5", error(400))
    fake_server.script("gpt-4o-mini", error(400))
    result = h.run()
    assert result.status == "failed"
    assert "deliveries" not in result.route
    assert not (state_dir(h) / "replies").exists()
