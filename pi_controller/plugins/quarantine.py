"""Quarantine: a plugin that keeps failing is left out for a while, longer at each relapse.

One `Quarantine` per loaded plugin (a replaced file gets a new one, so it leaves quarantine at once).
Faults are failed calls and rejected commands, counted on the loop's monotonic clock in a sliding
window; at `failures` within `window_s` the plugin rests for `backoff_s`, doubled at each relapse up
to `max_backoff_s`. A plugin that relapses after a whole window of good conduct starts again from
`backoff_s`. Released, a plugin is on probation until a clean call: it counts as quarantined till then,
so one that fails every call does not show loaded between two rests. Called from the tick thread only.
"""

from __future__ import annotations

from collections import deque

import structlog

from pi_controller.config import QuarantineSettings

log = structlog.get_logger("pi_controller.plugins")


class Quarantine:
    def __init__(self, plugin: str, settings: QuarantineSettings):
        self.plugin = plugin
        self.settings = settings
        self.until: float | None = None  # monotonic time its quarantine ends, while it lasts
        self.reason: str | None = None  # the last fault that counted towards it
        self._faults: deque[float] = deque()
        self._relapses = 0
        self._released: float | None = None
        self.probation = False  # released, and no clean call since (the loop tells `record` of one only then)

    @property
    def quarantined(self) -> bool:
        """Resting: not called."""
        return self.until is not None

    @property
    def shown_quarantined(self) -> bool:
        """What its state says: resting, or released and not yet called cleanly."""
        return self.until is not None or self.probation

    def admit(self, now: float, tick: int) -> bool:
        """Whether to call the plugin this tick; ends the quarantine once its backoff has passed."""
        if self.until is None:
            return True
        if now < self.until:
            return False
        self.until, self._released, self.probation = None, now, True
        log.info("plugin_released", plugin=self.plugin, tick=tick, relapses=self._relapses)
        return True

    def record(self, now: float, tick: int, faults: int, reason: str) -> bool:
        """Count a call's faults (0 for a clean call); quarantine the plugin past the limit. True when this
        call's faults quarantined it."""
        if faults == 0:
            self.probation = False
            return False
        self.reason = reason
        self._faults.extend([now] * min(faults, self.settings.failures))
        while self._faults and self._faults[0] <= now - self.settings.window_s:
            self._faults.popleft()
        if len(self._faults) < self.settings.failures:
            return False
        self._quarantine(now, tick)
        return True

    def _quarantine(self, now: float, tick: int) -> None:
        if self._released is not None and now - self._released > self.settings.window_s:
            self._relapses = 0  # it behaved for a whole window: a fresh start
        backoff = min(self.settings.backoff_s * 2 ** self._relapses, self.settings.max_backoff_s)
        self._relapses += 1
        self._faults.clear()
        self.until = now + backoff
        log.warning("plugin_quarantined", plugin=self.plugin, tick=tick, backoff_s=backoff,
                    failures=self.settings.failures, window_s=self.settings.window_s, reason=self.reason)
