"""How many of the plugins that should run do: what READY=1's status, /ready and the logs say.

The rule: every plugin file in the folder that is not disabled should run, and so should every plugin
named in the config (`plugins.settings` not disabling it, `plugins.required`). One that failed to load (a
bad file, a refused grant, a compile error) or is named but has no file (the folder deleted, or not
installed yet) keeps /ready at 503 until it loads, and systemd's status says which. A quarantined plugin is
loaded and counts: quarantine is the sandbox working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    from pi_controller.plugins.sandbox import PluginStatus


@dataclass(frozen=True)
class Readiness:
    loaded: int
    expected: int
    failed: tuple[str, ...]
    missing: tuple[str, ...] = ()

    @classmethod
    def of(cls, status: Mapping[str, PluginStatus], named: Iterable[str] = ()) -> Readiness:
        """`status`: the folder's plugins; `named`: those the config names, which should be among them."""
        expected = [name for name, plugin in status.items() if plugin.state != "disabled"]
        failed = tuple(sorted(name for name, plugin in status.items() if plugin.state == "failed"))
        missing = tuple(sorted(set(named) - set(status)))
        return cls(len(expected) - len(failed), len(expected) + len(missing), failed, missing)

    @property
    def complete(self) -> bool:
        return not (self.failed or self.missing)

    def __str__(self) -> str:
        text = f"{self.loaded} of {self.expected} plugins loaded"
        text += f"; failed: {', '.join(self.failed)}" if self.failed else ""
        return text + (f"; missing: {', '.join(self.missing)}" if self.missing else "")
