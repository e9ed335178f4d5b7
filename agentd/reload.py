"""What a config reload changes: loops added, removed, changed and rescheduled; key checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentd.config import Config
from agentd.errors import MissingKeyError
from agentd.ledger import Ledger
from agentd.logs import get_logger
from agentd.routing import tiers_used
from agentd.scheduling import schedule_key


@dataclass(frozen=True)
class ConfigChange:
    """The difference between the running config and a new one, by loop name."""

    added: tuple[str, ...] = ()  # scheduled now, not before (new or newly enabled)
    removed: tuple[str, ...] = ()  # scheduled before, not now (gone or disabled)
    changed: tuple[str, ...] = ()  # kept loops whose settings differ
    rescheduled: tuple[str, ...] = ()  # kept loops whose job is replaced (schedule or zone)
    settings: tuple[str, ...] = ()  # top-level keys that differ (providers, tiers, budgets …)

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-able lists, for the control API and the `daemon.reloaded` log event."""
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "rescheduled": list(self.rescheduled),
            "settings": list(self.settings),
        }

    def summary(self) -> str:
        """One line for people, e.g. `reloaded: added research; changed heartbeat`."""
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("settings changed:", self.settings),
            )
            if names
        ]
        return "reloaded: " + ("; ".join(parts) if parts else "no changes")


def _scheduled(config: Config) -> set[str]:
    return {name for name, loop in config.loops.items() if loop.enabled}


def diff_configs(old: Config, new: Config) -> ConfigChange:
    """Compare two configs loop by loop (pydantic models compare by value)."""
    before, after = _scheduled(old), _scheduled(new)
    added = sorted(after - before)
    removed = sorted(before - after)
    kept = sorted(old.loops.keys() & new.loops.keys())
    changed = [
        n for n in kept if old.loops[n] != new.loops[n] and n not in added and n not in removed
    ]
    # The zone and the misfire grace are part of every job: a change reschedules them all.
    everything = (old.timezone, old.daemon.misfire_grace_s) != (
        new.timezone,
        new.daemon.misfire_grace_s,
    )
    rescheduled = [
        n
        for n in sorted(before & after)
        if everything or schedule_key(old.loops[n]) != schedule_key(new.loops[n])
    ]
    settings = sorted(
        key
        for key in Config.model_fields
        if key != "loops" and getattr(old, key) != getattr(new, key)
    )
    if old.path != new.path:
        settings.append("path")
    return ConfigChange(
        tuple(added), tuple(removed), tuple(changed), tuple(rescheduled), tuple(settings)
    )


def reload_cost_warning(old: Config, new: Config, ledger: Ledger | None) -> dict[str, Any] | None:
    """After a reload: warn (`daemon.reload_cost_increase`) when the projected monthly total
    rises by more than `guardrails.reload_increase_warn`; the figures, or None.

    Never fails the reload: a projection problem is logged and ignored.
    """
    from agentd.guardrails import reload_cost_change

    try:
        return reload_cost_change(old, new, ledger)
    except Exception as exc:  # the new config is already in force; a warning must not undo it
        get_logger().warning("daemon.reload_projection_failed", error=str(exc))
        return None


def check_primary_keys(
    config: Config, *, simulate: bool, env: Mapping[str, str] | None = None
) -> None:
    """MissingKeyError when a primary model an enabled loop needs has no API key (not simulated).

    Fallback models may lack keys (the executor skips them); a loop whose first model cannot
    be called is a configuration error, found at start or reload rather than at its first run.
    """
    if simulate:
        return
    for name, loop in config.loops.items():
        if not loop.enabled:
            continue
        # The loop's primary model, and the primary of every tier its route can reach (a
        # classifier, reviewer or escalation), as the runner checks before each run.
        primaries = [config.chain(name)[0]]
        primaries += [config.tier_chain(tier)[0] for _, tier, _ in tiers_used(loop)]
        for entry in primaries:
            try:
                config.api_key(entry.provider_name, env)
            except MissingKeyError as exc:
                raise MissingKeyError(f"loop {name!r}: {exc}") from None
