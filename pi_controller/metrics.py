"""Prometheus metrics and /health and /ready, on one port, off by default, on localhost by default.

prometheus-client does the exposition format and the metric types; the HTTP server is the standard
library's, one thread, so that /health and /ready can sit beside /metrics.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Mapping

import structlog

from pi_controller.observer import LoopObserver, TickReport
from pi_controller.ownership import Failsafe
from pi_controller.readiness import Readiness

if TYPE_CHECKING:
    from pi_controller.plugins import PluginStatus

log = structlog.get_logger("pi_controller.metrics")

# Plugin calls take tens of microseconds; a timeout is milliseconds.
CALL_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1)
TICK_BUCKETS = (0.5e-3, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0)


class Metrics(LoopObserver):
    def __init__(self, period: float, plugins: Callable[[], Mapping[str, PluginStatus]],
                 timer: Callable[[], float] = time.monotonic):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.period = period
        self._plugins = plugins
        self._timer = timer
        self._last_tick: float | None = None
        self.calls = Counter("extism_plugin_calls_total", "Plugin calls", ["plugin"], registry=self.registry)
        self.errors = Counter("extism_plugin_errors_total", "Plugin calls that failed", ["plugin"],
                              registry=self.registry)
        self.call_seconds = Histogram("extism_plugin_duration_seconds", "Plugin call time", ["plugin"],
                                      buckets=CALL_BUCKETS, registry=self.registry)
        self.active = Gauge("extism_active_plugins", "1 for each plugin loaded and called", ["plugin"],
                            registry=self.registry)
        self.tick_seconds = Histogram("pi_controller_tick_duration_seconds", "Work per tick",
                                      buckets=TICK_BUCKETS, registry=self.registry)
        self.jitter_seconds = Histogram("pi_controller_tick_start_jitter_seconds", "Tick start after its deadline",
                                        buckets=TICK_BUCKETS, registry=self.registry)
        self.missed = Counter("pi_controller_missed_ticks_total", "Deadlines skipped by overruns",
                              registry=self.registry)
        self.failsafes = Counter("pi_controller_failsafes_total",
                                 "Actuators put in their safe state because their owner failed or its lease ran out",
                                 ["device"], registry=self.registry)

    def plugin_called(self, plugin: str, seconds: float, failed: bool) -> None:
        self.calls.labels(plugin).inc()
        self.call_seconds.labels(plugin).observe(seconds)
        if failed:
            self.errors.labels(plugin).inc()

    def actuator_failsafe(self, failsafe: Failsafe) -> None:
        self.failsafes.labels(failsafe.device_id).inc()

    def tick_done(self, report: TickReport) -> None:
        self._last_tick = self._timer()
        self.tick_seconds.observe(report.duration)
        self.jitter_seconds.observe(max(0.0, report.jitter))
        if report.missed:
            self.missed.inc(report.missed)

    def healthy(self) -> bool:
        """Ticking on time: a tick completed within the last three periods (at least a second)."""
        return self._last_tick is not None and self._timer() - self._last_tick < max(1.0, 3 * self.period)

    def ready(self) -> tuple[bool, str]:
        """Started (the first tick has run) with every plugin of the folder loaded; and what to say."""
        if self._last_tick is None:
            return False, "not yet: starting"
        plugins = Readiness.of(self._plugins())
        return plugins.complete, f"{'ok' if plugins.complete else 'not ready'}: {plugins}"

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        self.active.clear()
        for name, status in self._plugins().items():
            if status.state in ("loaded", "quarantined"):
                self.active.labels(name).set(1)
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics, /health and /ready from one thread of its own."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_listening", host=self.address[0], port=self.address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        if self.path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return self._answer(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        if self.path == "/health":
            ok = self.metrics.healthy()
            return self._answer(200 if ok else 503, b"ok\n" if ok else b"not ticking on time\n")
        if self.path == "/ready":
            ok, text = self.metrics.ready()
            return self._answer(200 if ok else 503, f"{text}\n".encode())
        self._answer(404, b"try /metrics, /health or /ready\n")

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds are not news
