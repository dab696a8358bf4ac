"""When several plugins command one actuator in a tick, the highest priority wins.

Commands arrive in call order (highest priority first, then plugin name), so the first command for a
device is the winner; a later one with another target is a conflict, reported to the caller.
"""

from __future__ import annotations

from typing import Iterable

from pi_controller.contract import Command


def resolve(commands: Iterable[Command]) -> tuple[list[Command], list[tuple[Command, Command]]]:
    """The winning command per device, and (winner, loser) pairs that asked for another target."""
    winners: dict[str, Command] = {}
    conflicts: list[tuple[Command, Command]] = []
    for command in commands:
        winner = winners.setdefault(command.device_id, command)
        if winner is not command and winner.target != command.target and winner.plugin != command.plugin:
            conflicts.append((winner, command))
        elif winner is not command and winner.plugin == command.plugin:
            winners[command.device_id] = command  # a plugin's own later command supersedes its earlier one
    return list(winners.values()), conflicts
