"""A token bucket: what bounds the log's lines and MQTT's messages per second."""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, at most `burst` kept; taking more than there are leaves a debt that the
    next refills pay first. Time comes from the owner's clock."""

    def __init__(self, rate: float, burst: float, now: float, tokens: float | None = None):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst) if tokens is None else tokens
        self._last = now

    def refill(self, now: float) -> float:
        """The tokens there are at `now`."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        return self.tokens

    def take(self, count: float = 1) -> None:
        self.tokens -= count
