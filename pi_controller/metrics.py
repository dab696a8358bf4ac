"""Prometheus metrics and /health and /ready, on one port, off by default, on localhost by default.

prometheus-client does the exposition format and the metric types; the HTTP server is the standard
library's, one thread, so that /health and /ready can sit beside /metrics.

Every name starts with `pi_controller_`, and every series is there from the first scrape (counters at
0), so that an alert on `increase(...)` sees the first error, not a series appearing. What the loop
counts as it goes (calls, tick times, reloads) is pushed here; what other parts already hold (plugin
states, sensor validity, safety holds, watchdog trips) is read at scrape time through `Source`.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol

import structlog

from pi_controller.observer import LoopObserver, TickReport
from pi_controller.readiness import Readiness
from pi_controller.safety.ownership import Failsafe

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from pi_controller.plugins.sandbox import PluginStatus

log = structlog.get_logger("pi_controller.metrics")

PREFIX = "pi_controller"
# Plugin calls take tens of microseconds; a timeout is milliseconds.
CALL_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1)
TICK_BUCKETS = (0.5e-3, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0)
PLUGIN_STATES = ("loaded", "quarantined", "failed", "disabled")
RELOAD_OUTCOMES = ("applied", "refused", "failed")


class Source(Protocol):
    """What metrics read at scrape time, on the server's thread: each answer is a fresh copy."""

    def plugin_statuses(self) -> Mapping[str, PluginStatus]: ...

    def actuator_ids(self) -> Iterable[str]: ...

    def sensor_validity(self) -> Mapping[str, bool]: ...

    def safety_holds(self) -> Mapping[str, int]: ...

    def watchdog_trips(self) -> int: ...

    def shadow_agreement(self) -> Mapping[tuple[str, str], tuple[int, int]]:
        """(plugin, actuator or "*") -> (ticks its shadow agreed, ticks compared)."""

    def mqtt_link(self) -> tuple[bool, int] | None:
        """(connected to the broker, connection attempts that failed); None without MQTT."""


class Metrics(LoopObserver):
    def __init__(self, period: float, source: Source, timer: Callable[[], float] = time.monotonic):
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the output and nothing here reads them
        self.registry = CollectorRegistry()
        self.period = period
        self.source = source
        self._timer = timer
        self._last_tick: float | None = None
        ProcessCollector(namespace=PREFIX, registry=self.registry)  # RSS, open fds, CPU seconds, start time
        self.calls = Counter(f"{PREFIX}_plugin_calls_total", "Plugin calls", ["plugin"], registry=self.registry)
        self.errors = Counter(f"{PREFIX}_plugin_errors_total", "Plugin calls that failed", ["plugin"],
                              registry=self.registry)
        self.call_seconds = Histogram(f"{PREFIX}_plugin_call_duration_seconds", "Plugin call time", ["plugin"],
                                      buckets=CALL_BUCKETS, registry=self.registry)
        self.tick_seconds = Histogram(f"{PREFIX}_tick_duration_seconds", "Work per tick",
                                      buckets=TICK_BUCKETS, registry=self.registry)
        self.jitter_seconds = Histogram(f"{PREFIX}_tick_start_jitter_seconds", "Tick start after its deadline",
                                        buckets=TICK_BUCKETS, registry=self.registry)
        self.missed = Counter(f"{PREFIX}_missed_ticks_total", "Deadlines skipped by overruns", registry=self.registry)
        self.failsafes = Counter(f"{PREFIX}_failsafes_total",
                                 "Actuators put in their safe state because their owner failed or its lease ran out",
                                 ["device"], registry=self.registry)
        self.reloads = Counter(f"{PREFIX}_reloads_total", "Config reloads (SIGHUP) by result", ["result"],
                               registry=self.registry)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.registry.register(_StateCollector(self))
        self._named: set[tuple[str, str]] = set()
        self.name_series()

    def name_series(self) -> None:
        """Series for every plugin of the folder and every actuator, at 0 until counted (at start, and after
        a reload or a hot swap: the scrape calls this too)."""
        names = {("plugin", name) for name in self.source.plugin_statuses()}
        names |= {("device", device) for device in self.source.actuator_ids()}
        for kind, name in names - self._named:
            if kind == "plugin":
                self.calls.labels(name)
                self.errors.labels(name)
                self.call_seconds.labels(name)
            else:
                self.failsafes.labels(name)
        self._named |= names

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

    def reloaded(self, outcome: str) -> None:
        self.reloads.labels(outcome).inc()

    def healthy(self) -> bool:
        """Ticking on time: a tick completed within the last three periods (at least a second)."""
        return self._last_tick is not None and self._timer() - self._last_tick < max(1.0, 3 * self.period)

    def ready(self) -> tuple[bool, str]:
        """Started (the first tick has run) with every plugin of the folder loaded; and what to say."""
        if self._last_tick is None:
            return False, "not yet: starting"
        plugins = Readiness.of(self.source.plugin_statuses())
        return plugins.complete, f"{'ok' if plugins.complete else 'not ready'}: {plugins}"

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        self.name_series()
        return generate_latest(self.registry)


class _StateCollector:
    """What other parts hold, read when scraped."""

    def __init__(self, metrics: Metrics):
        self._source = metrics.source

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        states = GaugeMetricFamily(f"{PREFIX}_plugin_state", "1 for the state each plugin of the folder is in",
                                   labels=["plugin", "state"])
        for name, status in sorted(self._source.plugin_statuses().items()):
            for state in PLUGIN_STATES:
                states.add_metric([name, state], 1.0 if status.state == state else 0.0)
        yield states
        valid = GaugeMetricFamily(f"{PREFIX}_sensor_valid", "1 while the sensor's last reading is valid",
                                  labels=["sensor"])
        for sensor, ok in sorted(self._source.sensor_validity().items()):
            valid.add_metric([sensor], 1.0 if ok else 0.0)
        yield valid
        holds = CounterMetricFamily(f"{PREFIX}_safety_holds", "Commands the safety rules held back or forced safe, "
                                                              "by actuator", labels=["device"])
        for device, count in sorted(self._source.safety_holds().items()):
            holds.add_metric([device], float(count))
        yield holds
        yield CounterMetricFamily(f"{PREFIX}_watchdog_trips", "Times the watchdog drove every actuator safe",
                                  value=float(self._source.watchdog_trips()))
        yield from _shadow_families(self._source.shadow_agreement())
        link = self._source.mqtt_link()
        if link is not None:
            yield GaugeMetricFamily(f"{PREFIX}_mqtt_connected", "1 while connected to the MQTT broker",
                                    value=1.0 if link[0] else 0.0)
            yield CounterMetricFamily(f"{PREFIX}_mqtt_connect_failures", "Connection attempts to the MQTT broker "
                                      "that failed (the reason is logged once each: mqtt_connect_failed)",
                                      value=float(link[1]))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names vary with the config; nothing to check them against at registration


def _shadow_families(agreement: Mapping[tuple[str, str], tuple[int, int]]) -> Iterator[Metric]:
    """How each shadow plugin agrees with its live plugin, per actuator ("*": whole calls)."""
    from prometheus_client.core import CounterMetricFamily

    labels = ["plugin", "device"]
    compared = CounterMetricFamily(f"{PREFIX}_shadow_compared_ticks", "Ticks a shadow plugin ran beside its live "
                                                                      "plugin", labels=labels)
    agreed = CounterMetricFamily(f"{PREFIX}_shadow_agreed_ticks", "Ticks a shadow plugin's commands agreed with "
                                                                  "its live plugin's", labels=labels)
    for key, (agree, ticks) in sorted(agreement.items()):
        compared.add_metric(list(key), float(ticks))
        agreed.add_metric(list(key), float(agree))
    yield compared
    yield agreed


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

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path  # Prometheus and probes may add a query string
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return self._answer(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        if path == "/health":
            ok = self.metrics.healthy()
            return self._answer(200 if ok else 503, b"ok\n" if ok else b"not ticking on time\n")
        if path == "/ready":
            ok, text = self.metrics.ready()
            return self._answer(200 if ok else 503, f"{text}\n".encode())
        self._answer(404, b"try /metrics, /health or /ready\n")

    def version_string(self) -> str:
        return "pi-controller"  # not http.server's default, which tells every client our Python version

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds are not news
