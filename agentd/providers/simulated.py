"""The offline simulated model behind `--simulate`: deterministic replies and token counts."""

from __future__ import annotations

import hashlib
import json
import re

from agentd.providers.base import Message, Reply, Request, Usage

# A quiet token such as HEARTBEAT_OK: a prompt that offers one gets it back, so simulated
# heartbeats behave like a healthy real run (recorded, not delivered).
QUIET_TOKEN = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_OK\b")
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
        quiet = QUIET_TOKEN.search("\n".join(parts))
        if quiet:
            text = quiet.group(0)
        else:
            text = (
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


def _pair(message: Message) -> list[str]:
    return [message.role, message.content]
