"""The offline simulated model behind `--simulate`: deterministic replies and token counts.

What it answers, so that every loop behaves like a healthy real run:

- a prompt with a line `Labels: a | b | c` (the classifier's last line, see
  `agentd.routeprompts`) gets one of those labels;
- a prompt asking for `one number from 0.0 to 1.0` (the reviewer's last line) gets a score
  from 0.50 to 1.00;
- a prompt that offers a quiet token such as `HEARTBEAT_OK` gets the token back;
- anything else gets a short placeholder text.

When a prompt has several of these, the one nearest its end wins: it is the instruction that
frames everything before it. The choice among labels and the score come from a hash of the
request, so the same request always gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import re

from agentd.providers.base import Message, Reply, Request, Usage

# A quiet token such as HEARTBEAT_OK: a prompt that offers one gets it back, so simulated
# heartbeats behave like a healthy real run (recorded, not delivered).
QUIET_TOKEN = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_OK\b")
LABELS_LINE = re.compile(r"^Labels: *([a-z0-9_]+(?: *\| *[a-z0-9_]+)*) *$", re.MULTILINE)
SCORE_REQUEST = re.compile(r"one number from 0\.0 to 1\.0")
MESSAGE_OVERHEAD = 4  # tokens a chat format spends around each message (role, separators)
REPLY_OVERHEAD = 3  # and to prime the reply


class SimulatedProvider:
    """A stand-in model that never touches the network and always answers the same way."""

    def __init__(self, name: str = "simulated") -> None:
        self.name = name

    async def complete(self, request: Request) -> Reply:
        """Answer from a hash of the request: same request, same reply and usage."""
        parts = [request.system or "", *(m.content for m in request.messages)]
        digest = hashlib.sha256(
            json.dumps(
                [request.model, request.max_tokens, request.system, *map(_pair, request.messages)]
            ).encode()
        ).digest()
        h = int.from_bytes(digest[:8], "big")
        prompt_bytes = sum(len(p.encode()) for p in parts)
        # An estimate of what a real model would report (~4 bytes per token), not a bound.
        input_tokens = max(
            1, prompt_bytes // 4 + MESSAGE_OVERHEAD * len(request.messages) + REPLY_OVERHEAD
        )
        output_tokens = min(request.max_tokens, 50 + h % 200)
        text = _answer("\n".join(parts), h) or (
            f"[simulated reply from {request.model}] Simulated answer {h % 10_000:04d} to a "
            f"{len(request.messages)}-message prompt; no model was called."
        )
        return Reply(
            text=text,
            usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
            model=request.model,
            request_id=None,  # no provider was called, so there is no request to trace
            stop_reason="end_turn",
        )

    async def aclose(self) -> None:
        """Nothing to release."""


def _answer(prompt: str, h: int) -> str | None:
    """A label, a score or a quiet token, when the prompt asks for one (the last ask wins)."""
    asks: list[tuple[int, str]] = []
    labels = list(LABELS_LINE.finditer(prompt))
    if labels:
        names = [name.strip() for name in labels[-1].group(1).split("|")]
        asks.append((labels[-1].start(), names[h % len(names)]))
    scores = list(SCORE_REQUEST.finditer(prompt))
    if scores:
        asks.append((scores[-1].start(), f"{0.5 + (h % 51) / 100:.2f}"))
    quiet = list(QUIET_TOKEN.finditer(prompt))
    if quiet:
        asks.append((quiet[-1].start(), quiet[-1].group(0)))
    return max(asks)[1] if asks else None


def _pair(message: Message) -> list[str]:
    return [message.role, message.content]
