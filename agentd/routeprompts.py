"""The default prompt templates of the classifier, the reviewer and the escalation call, and
what their replies mean (`parse_label`, `parse_score`).

A loop may replace each one with a file (`routing.classifier_prompt`, `reviewer_prompt`,
`escalation_prompt`). Placeholders are filled in one pass and never rescanned, so a task that
itself contains `{draft}` stays as written: `{task}` (the task's prompt), `{labels}` (the label
list), `{draft}` (the draft answer) and `{score}` (the review's score, or "unparseable").

The last lines of the classifier and reviewer prompts are also what the simulated provider
(`--simulate`) recognises to answer with a label or a score: keep them when editing.
"""

from __future__ import annotations

import re

from agentd.loopconfig import LABELS

# Placeholders each template must contain: without them the call cannot see its input.
REQUIRED = {
    "classifier_prompt": ("{task}",),
    "reviewer_prompt": ("{task}", "{draft}"),
    "escalation_prompt": ("{task}", "{draft}"),
}
_PLACEHOLDER = re.compile(r"\{(task|labels|draft|score)\}")
_QUOTES = "\"'`“”‘’"
# A sign only where a word cannot go on: the hyphen of "claude-haiku-4-5" or "v1.2-3" joins
# words and is no minus sign (that reply's first number is the 4).
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:\d+(?:\.\d*)?|\.\d+)")
_DENOMINATOR = re.compile(r"\s*/\s*(\d+(?:\.\d*)?|\.\d+)")

CLASSIFIER = """\
You route tasks to language models. Read the task below and decide what kind of work it is.

<task>
{task}
</task>

The labels:
- simple_extraction: pull facts, fields or short answers out of given text
- classification: choose a category, a label, yes/no or a priority
- content_generation: write, rewrite, summarise or translate prose
- code_task: write, review, explain or fix code
- complex_reasoning: multi-step reasoning, planning, analysis or high-stakes decisions

Reply with exactly one label and nothing else.
Labels: {labels}
"""

REVIEWER = """\
You review a draft answer before it is delivered. Judge whether it is correct, complete and
follows every instruction of the task.

<task>
{task}
</task>

<draft>
{draft}
</draft>

Score the draft from 0.0 (useless) to 1.0 (cannot be improved).
Reply with the score only: one number from 0.0 to 1.0.
"""

ESCALATION = """\
{task}

---

A first draft of the answer to the task above was reviewed and scored {score} on a scale from
0.0 to 1.0: not good enough to deliver. Here it is:

<draft>
{draft}
</draft>

Write the improved, complete answer to the task. Fix what is wrong or missing in the draft and
keep what is right. Reply with the answer only, in the format the task asks for, without
commenting on the draft.
"""


def fill(template: str, **values: str) -> str:
    """Fill `{task}`, `{labels}`, `{draft}`, `{score}` in one pass; other braces stay as written."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# ---------------------------------------------------------------------------- the replies


def normalise_reply(text: str) -> str:
    """A classifier reply as compared with the labels: lower case, without surrounding
    whitespace, quotes or backticks, and without a trailing period."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_QUOTES).strip()
        if text.endswith("."):
            text = text[:-1]
    return text.lower()


def parse_label(reply: str) -> str | None:
    """The label of a classifier reply, only when the whole normalised reply is one label."""
    text = normalise_reply(reply)
    return text if text in LABELS else None


def parse_score(reply: str) -> float | None:
    """A review score from 0.0 to 1.0: the FIRST number of the reply; None when there is none.

    A `/ d` right after the number divides by d (`Score: 0.7/1` → 0.7, `8/10` → 0.8); a `%`
    right after it divides by 100 (`85%` → 0.85); the result is clamped to 0–1 (`7` → 1.0).
    A zero denominator makes the reply unparseable.
    """
    match = _NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group())
    rest = reply[match.end() :]
    denominator = _DENOMINATOR.match(rest)
    if denominator is not None:
        divisor = float(denominator.group(1))
        if divisor == 0:
            return None
        value /= divisor
    elif rest.lstrip().startswith("%"):
        value /= 100
    return min(1.0, max(0.0, value))
