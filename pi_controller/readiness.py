"""How many of the plugins in the folder run: what READY=1's status, /ready and the logs say.

The rule: every plugin file in the folder that is not disabled should run. One that failed to load (a
bad file, a refused grant, a compile error) keeps /ready at 503 until it loads, and systemd's status
says which. A quarantined plugin is loaded and counts: quarantine is the sandbox working. A plugin named
in the config but with no file in the folder is not counted (it is logged as
`plugin_configured_but_missing`): the folder is what is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from pi_controller.plugins.sandbox import PluginStatus


@dataclass(frozen=True)
class Readiness:
    loaded: int
    expected: int
    failed: tuple[str, ...]

    @classmethod
    def of(cls, status: Mapping[str, PluginStatus]) -> Readiness:
        expected = [name for name, plugin in status.items() if plugin.state != "disabled"]
        failed = tuple(sorted(name for name, plugin in status.items() if plugin.state == "failed"))
        return cls(len(expected) - len(failed), len(expected), failed)

    @property
    def complete(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        text = f"{self.loaded} of {self.expected} plugins loaded"
        return f"{text}; failed: {', '.join(self.failed)}" if self.failed else text
