"""The shadow plugins over a daemon's life: built at start and by each reload, rebuilt when the shadow
folder comes or goes, and followed for shadows dropped in or removed while the live folder is followed
(`plugins.watch`).

Building compiles (seconds, cold, on a Pi): once the loop runs it happens on a worker thread, and only
the adoption waits for the gap between two ticks. An adopted set takes over the comparisons of each
shadow whose file did not change. The daemon calls `start`, `prepare` and `reload` (a config reload, in
two steps, beside its live plugins), `stop` and `close`, as it does on telemetry; the live folder's
watcher tells `folder_changed`.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from pi_controller.clock import Clock
from pi_controller.config import PluginsSettings
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.shadow import FOLDER, Shadows
from pi_controller.plugins.watch import PluginWatcher
from pi_controller.reloads import Gap, prepared

log = structlog.get_logger("pi_controller.shadow")


class ShadowSupervisor:
    def __init__(self, settings: PluginsSettings, live: PluginSet, clock: Clock, adopted: Callable[[Shadows], None]):
        """The shadows beside `live` (a set that keeps its identity across reloads), built now; `adopted`
        is told of each set that replaces them, between two ticks."""
        self.settings = settings
        self.live = live
        self._clock = clock
        self._adopted = adopted
        self.current = self._build(settings, live)
        self._gap: Gap | None = None  # from start to stop: the loop runs
        self._watcher: asyncio.Task[None] | None = None
        self._rebuild: asyncio.Task[None] | None = None

    def _build(self, settings: PluginsSettings, live: PluginSet) -> Shadows:
        return Shadows(settings, live, self.live, self._clock)

    def start(self, gap: Gap) -> None:
        """Follow the shadow folder while the live folder is followed; swaps go through `gap`."""
        self._gap = gap
        self._follow(self.current.plugins.directory.is_dir())  # before the first tick: as the folder is now

    def folder_changed(self, name: str) -> None:
        """The live folder's watcher saw a subfolder `name` come or go: if it is the shadow folder, rebuild."""
        gap = self._gap
        if name != FOLDER or gap is None or (self._rebuild is not None and not self._rebuild.done()):
            return

        async def rebuild() -> None:  # what it prepares is closed if the stop comes first
            shadows = await prepared(lambda: self._build(self.settings, self.live), Shadows.close)
            await gap.in_gap(lambda: self._adopt(shadows), shadows.close)

        self._rebuild = asyncio.create_task(rebuild(), name="shadow-reload")

    async def prepare(self, settings: PluginsSettings, live: PluginSet) -> Shadows | None:
        """A config reload's shadows, beside its prepared live plugins `live`, built off the event loop;
        None if they failed (logged): the live plugins reload all the same."""
        try:
            return await prepared(lambda: self._build(settings, live), Shadows.close)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shadows_reload_failed", directory=str(live.directory / FOLDER))
            return None

    def reload(self, settings: PluginsSettings, shadows: Shadows | None) -> None:
        """Between two ticks, once the reload's live plugins are adopted: its shadows (None: the running
        ones stay). A rebuild under way for a folder no longer followed is cancelled."""
        moved = settings.watch != self.settings.watch or self.current.plugins.directory != self.live.directory / FOLDER
        self.settings = settings
        if moved and self._rebuild is not None:
            self._rebuild.cancel()  # closes what it prepared
        if shadows is not None:
            self._adopt(shadows)
        elif moved:
            self._follow(self.current.found)

    def live_changed(self) -> None:
        """Between two ticks, after the live set changed: the shadows' share of the tick follows it."""
        self.current.follow_live()

    def _adopt(self, shadows: Shadows) -> None:
        old, self.current = self.current, shadows
        shadows.follow_live()  # built off the event loop: the live set may have changed since
        shadows.carry_on(old)
        self._adopted(shadows)
        old.close()
        self._follow(shadows.found, rescan=True)  # what landed between the build's look at the folder and the watch

    def _follow(self, there: bool, rescan: bool = False) -> None:
        """Watch the current set's folder, if the live folder is watched and the shadow folder is `there`."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._gap is not None and self.settings.watch and there:
            # A shadow swapped in or out is a set adopted anew: its agreement's entity comes or goes.
            watcher = PluginWatcher(self.current.plugins, self._gap, lambda: self._adopted(self.current), rescan=rescan)
            self._watcher = asyncio.create_task(watcher.run(), name="shadow-watch")

    def stop(self) -> None:
        """No more watching, and a rebuild under way cancelled (it closes what it prepared)."""
        for task in (self._watcher, self._rebuild):
            if task is not None:
                task.cancel()
        self._watcher = self._rebuild = None
        self._gap = None

    def close(self) -> None:
        self.current.close()
