"""The shipped `research` loop as Python: cheap questions first, then answers on its own tier.

agentd loads this file by path (`handler: ../loops/research.py:run` in the config), so it needs
no install. `ctx.prompt` is the loop's filled `prompt:` template (research.md) with the loop's
context; every `ctx.complete()` is a normal agentd call: budgeted, with fallbacks, in the ledger.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # agentd passes the object; importing it is only needed for type checkers
    from agentd.handlers import LoopContext

QUESTIONS = 3
QUESTION_TOKENS = 300
DEFAULT_TASK = "Find the most important open question in the project notes and work on it."
_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(\S.*?)\s*$")


def parse_questions(text: str, limit: int = QUESTIONS) -> list[str]:
    """The numbered or bulleted lines of a reply; its first non-empty lines if there are none."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    items = [m.group(1) for m in map(_ITEM.match, lines) if m]
    return (items or lines)[:limit]


async def run(ctx: LoopContext) -> str | None:
    """List a few questions on the fast tier, then work on each on the loop's tier."""
    task = ctx.prompt or DEFAULT_TASK
    # 1. The fast tier is enough to turn the task into concrete questions, and cheap.
    listing = await ctx.complete(
        f"{task}\n\n---\n\nDo not research yet. List the {QUESTIONS} specific questions whose "
        f"answers would move this task forward most, most valuable first: one per line, "
        f"numbered 1. to {QUESTIONS}, nothing else.",
        tier="fast",
        max_tokens=QUESTION_TOKENS,
        purpose="work",
    )
    questions = parse_questions(listing)
    if not questions:
        ctx.log.warning("research.no_questions")
        return None  # nothing to research: the run is ok and nothing is delivered
    numbered = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1))
    ctx.log.info("research.questions", count=len(questions))
    # 2. Each question on the loop's own tier (and budget plan). Every prompt starts with the
    #    same task and notes, so after the first call the provider's prompt cache serves that
    #    prefix at a tenth of the input price (agentd marks it: `cache: auto`).
    answers = []
    for i, question in enumerate(questions, 1):
        answer = await ctx.complete(
            f"{task}\n\n---\n\nWork on question {i} of {len(questions)} only: {question}\n"
            "Be brief if an earlier question already covers it.",
            purpose="work",
        )
        answers.append(f"## {i}. {question}\n\n{answer.strip()}")
    day = ctx.now.astimezone(ctx.config.tz).date().isoformat()
    body = "\n\n".join(answers)
    return f"# Research {day}\n\n{body}\n\n---\nQuestions considered:\n{numbered}\n"
