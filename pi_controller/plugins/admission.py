"""Who holds a share of the tick: the plugin budget goes by rank, never to whoever arrived first.

Plugins are called one after the other, so their `timeout_ms` may add up to at most the plugin budget
(`loop.plugin_budget` of a tick). Shares go by rank: plugins named in the config (`plugins.settings`,
`plugins.required`) before any other plugin dropped into the folder, then higher priority before lower,
then by name. A plugin displaces those ranked below it that leave it no room, and a quarantined plugin
holds its share only until another needs it, except that nothing dropped into the folder ever displaces
a plugin named in the config. So the same plugins run whichever arrived first, at start, on a reload or
by hot reload, and a trapping plugin dropped in with priority 999 keeps no thermostat out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Claim:
    """A plugin's claim on the budget."""

    name: str
    timeout_ms: int
    priority: int
    configured: bool  # named in the config
    resting: bool = False  # quarantined: it holds its share only until another needs it

    @property
    def rank(self) -> tuple[bool, int, str]:
        """Lower ranks first."""
        return not self.configured, -self.priority, self.name

    def describe(self) -> str:
        return f"{self.name} ({self.timeout_ms} ms{', named in the config' if self.configured else ''}" \
               f"{', quarantined' if self.resting else ''})"


class NoRoom(ValueError):
    """A claim that does not fit: the message names who holds the budget."""


def displaced(claim: Claim, holders: Iterable[Claim], budget_ms: float) -> list[Claim]:
    """The holders `claim` takes the place of to fit within `budget_ms` (as few as fit it: quarantined ones
    first, then the lowest ranked); NoRoom if those that do not yield to it leave no room."""
    others = [h for h in holders if h.name != claim.name]
    yielding = [h for h in others if _yields(h, claim)]
    staying = [h for h in others if not _yields(h, claim)]
    held = sum(h.timeout_ms for h in staying)
    if held + claim.timeout_ms > budget_ms:
        raise NoRoom(f"timeout_ms {claim.timeout_ms} does not fit the tick: {held} of the {budget_ms:g} ms plugin "
                     f"budget is held by {', '.join(h.describe() for h in staying) or 'nothing'}")
    total = held + sum(h.timeout_ms for h in yielding) + claim.timeout_ms
    out = []
    for holder in sorted(sorted(yielding, key=lambda h: h.rank, reverse=True), key=lambda h: not h.resting):
        if total <= budget_ms:
            break
        out.append(holder)
        total -= holder.timeout_ms
    return out


def _yields(holder: Claim, claim: Claim) -> bool:
    if holder.configured and not claim.configured:  # a plugin dropped in never keeps a configured one out
        return False
    return holder.resting or claim.rank < holder.rank



def refused_in_rank_order(claims: Iterable[Claim], budget_ms: float) -> dict[str, str]:
    """The claims left out, with why, when all are admitted by rank, as a folder is loaded at start."""
    admitted: list[Claim] = []
    refused = {}
    for claim in sorted(claims, key=lambda c: c.rank):
        try:
            displaced(claim, admitted, budget_ms)  # none: every claim admitted before it ranks higher
        except NoRoom as exc:
            refused[claim.name] = str(exc)
            continue
        admitted.append(claim)
    return refused
