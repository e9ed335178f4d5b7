"""Step 0 of a run: may it be skipped for free? A loop's `precheck:` command, an empty checklist.

- `precheck:` runs without a shell in the config's directory (a relative script path such as
  `../loops/check.sh` resolves against it), with the providers' key variables removed from
  its environment. Exit 0: there is work; its stdout becomes the context source `precheck`
  (`{precheck}` in the template, part of `{context}`, and appended like any other source when
  the template uses no source placeholder; empty stdout adds nothing). Exit 1: nothing to do,
  the run is recorded `skipped_noop`. Anything else (another exit status, a signal, a timeout,
  a missing program) fails the run with that reason, before any model call.
- The checklist of a loop is its `context:` file source named `checklist`. It is empty when,
  after HTML comments are removed, every line is blank, a Markdown heading, a thematic break,
  or a list / checklist item without text (`-`, `- [ ]`, `1.`). A checklist that matches no
  file is not empty: the run goes ahead and the prompt says the file is missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from agentd.config import Config
from agentd.context import SourceText, cap_utf8, child_env, matching_files, run_command

CHECKLIST_SOURCE = "checklist"
PRECHECK_PLACEHOLDER = "precheck"
NOTHING_TO_DO = 1  # the precheck's exit status that means "skip this tick"

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_EMPTY_LINE = re.compile(
    r"""^(?:
        \#{1,6}(?:\s.*)?         # ATX heading (its text does not make the list non-empty)
      | [-*_=]{3,}               # thematic break, setext underline
      | (?:[-*+]|\d+[.)])        # a list item marker ...
        (?:\s*\[[ xX]?\])?       # ... maybe a checkbox ...
        \s*                      # ... and no text
    )$""",
    re.VERBOSE,
)
_SETEXT = re.compile(r"^(?:=+|-{2,})$")
_LIST_ITEM = re.compile(r"^(?:[-*+]|\d+[.)])\s")


@dataclass(frozen=True)
class PrecheckOutcome:
    """What step 0 decided: `work` (with maybe a source to add), `noop` or `failed`."""

    decision: Literal["work", "noop", "failed"]
    reason: str | None = None
    source: SourceText | None = None
    route: dict[str, Any] = field(default_factory=dict)


def checklist_is_empty(text: str) -> bool:
    """Whether a checklist has no item with text (only headings, blanks, empty items)."""
    lines = [line.strip() for line in _COMMENT.sub("", text).splitlines()]
    for index, line in enumerate(lines):
        if not line or _EMPTY_LINE.match(line):
            continue
        underline = lines[index + 1] if index + 1 < len(lines) else ""
        if _SETEXT.match(underline) and not _LIST_ITEM.match(line):
            continue  # a setext heading's text (`Title` over `=====`)
        return False
    return True


def empty_checklist(config: Config, loop_name: str) -> str | None:
    """The checklist file(s) of the loop if every one is empty, else None (also with none)."""
    sources = [
        s
        for s in config.loops[loop_name].context
        if s.kind == "file" and s.name == CHECKLIST_SOURCE and s.file is not None
    ]
    if not sources:
        return None
    for source in sources:
        paths = matching_files(config, source)
        if not paths:
            return None  # missing: not "nothing to do" — the prompt will say it is missing
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    data = handle.read(source.max_bytes + 1)
            except OSError:
                return None
            if not checklist_is_empty(data.decode("utf-8", errors="replace")):
                return None
    return ", ".join(s.file or "" for s in sources)


def precheck_argv(config: Config, argv: list[str]) -> list[str]:
    """The precheck's argv with a relative script path resolved against the config directory."""
    argv = list(argv)
    if "/" in argv[0] and not os.path.isabs(argv[0]):
        argv[0] = str(config.resolve_path(argv[0]))
    return argv


async def run_precheck(config: Config, loop_name: str) -> PrecheckOutcome:
    """Step 0: the empty-checklist test, then the loop's `precheck:` command (if any)."""
    empty = empty_checklist(config, loop_name)
    if empty is not None:
        return PrecheckOutcome(
            "noop",
            f"nothing to do: checklist {empty} is empty",
            route={"noop": "checklist", "checklist": empty},
        )
    precheck = config.loops[loop_name].precheck
    if precheck is None:
        return PrecheckOutcome("work")
    result = await run_command(
        precheck_argv(config, precheck.command),
        cwd=config.dir,
        timeout_s=precheck.timeout_seconds,
        max_bytes=precheck.max_bytes,
        env=child_env(config),
    )
    name = precheck.command[0]
    if result.returncode == NOTHING_TO_DO:
        return PrecheckOutcome(
            "noop",
            f"nothing to do: precheck {name} exited 1",
            route={"noop": "precheck", "precheck": {"command": name, "exit": 1}},
        )
    if not result.ok:
        return PrecheckOutcome(
            "failed",
            f"precheck {name} failed: {result.error}",
            route={"precheck": {"command": name, "error": result.error}},
        )
    text = cap_utf8(result.stdout, precheck.max_bytes) if result.stdout else ""
    route = {"precheck": {"command": name, "exit": 0, "stdout_bytes": len(result.stdout)}}
    if not text.strip():
        return PrecheckOutcome("work", route=route)
    source = SourceText(PRECHECK_PLACEHOLDER, f"output of precheck {name}", text)
    return PrecheckOutcome("work", source=source, route=route)
