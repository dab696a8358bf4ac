"""What a plugin proposes for one tick: its output parsed and validated against the contract, and
screened by its grant. For calls beside the loop's own (replay, shadows); raises what the call and
the parse raise (`PluginCallError`, `OutputError`)."""

from __future__ import annotations

from typing import Mapping, Sequence

from pi_controller import contract
from pi_controller.contract import Command, CommandTarget, Rejection
from pi_controller.devices.sensors import Reading
from pi_controller.plugins.sandbox import SandboxedPlugin


def propose(plugin: SandboxedPlugin, context: bytes, readings: Sequence[Reading],
            targets: Mapping[str, CommandTarget], tick: int) -> tuple[list[Command], list[Rejection]]:
    raw = plugin.call(plugin.view(context, readings), tick)
    return plugin.screen(*contract.parse_output(raw, plugin.name, plugin.priority, targets))
