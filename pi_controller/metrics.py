"""Prometheus metrics and /health and /ready, on one port, off by default, on localhost by default.

prometheus-client does the exposition format and the metric types; the HTTP server is ours (`MetricsServer`),
a few lines of asyncio on a thread of its own, bounded in connections, time and bytes, so that /health and
/ready sit beside /metrics and nothing a client does costs a thread or prints a traceback.

Every name starts with `pi_controller_` but the process's own (`process_resident_memory_bytes`,
`process_cpu_seconds_total`...: the names every exporter gives them, which stock dashboards read), and
every series is there from the first scrape (counters at 0), so that an alert on `increase(...)` sees
the first error, not a series appearing. What the loop
counts as it goes (calls, tick times, reloads) is pushed here; what other parts already hold (plugin
states, sensor validity, safety holds, watchdog trips) is read at scrape time through `Source`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
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

    def readiness(self) -> Readiness:
        """How many of the plugins that should run do."""

    def actuator_ids(self) -> Iterable[str]: ...

    def sensor_validity(self) -> Mapping[str, bool]: ...

    def safety_holds(self) -> Mapping[str, int]: ...

    def watchdog_trips(self) -> int: ...

    def shadow_agreement(self) -> Mapping[tuple[str, str], tuple[int, int]]:
        """(plugin, actuator or "*") -> (ticks its shadow agreed, ticks compared)."""

    def mqtt_link(self) -> tuple[bool, int, int] | None:
        """(connected to the broker, connection attempts that failed, commands kept out by the rate
        limits); None without MQTT."""

    def recording(self) -> tuple[bool, int] | None:
        """(its file is being written, tick lines dropped); None without a recording."""


class Metrics(LoopObserver):
    def __init__(self, period: float, source: Source, timer: Callable[[], float] = time.monotonic):
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the output and nothing here reads them
        self.registry = CollectorRegistry()
        self.period = period
        self.source = source
        self._timer = timer
        self._last_tick: float | None = None
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU seconds...; the names stock dashboards use
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
        """Series for every plugin of the folder and every actuator, at 0 until counted, and none for one
        that went (at start, and after a reload or a hot swap: the scrape calls this too). One that comes
        back starts again at 0, which Prometheus takes as a counter's reset."""
        names = {("plugin", name) for name in self.source.plugin_statuses()}
        names |= {("device", device) for device in self.source.actuator_ids()}
        for kind, name in names ^ self._named:
            for family in (self.calls, self.errors, self.call_seconds) if kind == "plugin" else (self.failsafes,):
                if (kind, name) in names:
                    family.labels(name)
                else:
                    family.remove(name)
        self._named = names

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
        plugins = self.source.readiness()
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
        yield from _shadow_families(self._source.shadow_agreement(), set(self._source.actuator_ids()))
        recording = self._source.recording()
        if recording is not None:
            yield GaugeMetricFamily(f"{PREFIX}_recording_ok", "1 while the recording is written (0: it cannot be, "
                                    "logged once as recording_unavailable, and retried)", value=float(recording[0]))
            yield CounterMetricFamily(f"{PREFIX}_recording_dropped_lines", "Tick lines the recording could not take",
                                      value=float(recording[1]))
        link = self._source.mqtt_link()
        if link is not None:
            yield GaugeMetricFamily(f"{PREFIX}_mqtt_connected", "1 while connected to the MQTT broker",
                                    value=1.0 if link[0] else 0.0)
            yield CounterMetricFamily(f"{PREFIX}_mqtt_connect_failures", "Connection attempts to the MQTT broker "
                                      "that failed (the reason is logged once each: mqtt_connect_failed)",
                                      value=float(link[1]))
            yield CounterMetricFamily(f"{PREFIX}_mqtt_commands_rate_limited", "MQTT commands dropped unread over "
                                      "the rate limits, per topic or in all (logged: mqtt_commands_rate_limited)",
                                      value=float(link[2]))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names vary with the config; nothing to check them against at registration


def _shadow_families(agreement: Mapping[tuple[str, str], tuple[int, int]], actuators: set[str]
                     ) -> Iterator[Metric]:
    """How each shadow plugin agrees with its live plugin, per actuator of now ("*": whole calls). A device that
    is none (gone in a reload, or any name a plugin commands) gets no series: the whole calls count it."""
    from prometheus_client.core import CounterMetricFamily

    labels = ["plugin", "device"]
    compared = CounterMetricFamily(f"{PREFIX}_shadow_compared_ticks", "Ticks a shadow plugin ran beside its live "
                                                                      "plugin", labels=labels)
    agreed = CounterMetricFamily(f"{PREFIX}_shadow_agreed_ticks", "Ticks a shadow plugin's commands agreed with "
                                                                  "its live plugin's", labels=labels)
    for key, (agree, ticks) in sorted(agreement.items()):
        if key[1] != "*" and key[1] not in actuators:
            continue
        compared.add_metric(list(key), float(ticks))
        agreed.add_metric(list(key), float(agree))
    yield compared
    yield agreed


MAX_CONNECTIONS = 16  # Prometheus and a probe or two need a few; each holds a socket and a few KiB
TIMEOUT_S = 10.0  # Prometheus's default scrape timeout: to send a request, and again to take the answer
MAX_REQUEST_BYTES = 8192  # the request line and headers; a scrape sends a few hundred bytes
DROP_REASONS = ("capacity", "timeout", "bad_request")
TEXT = "text/plain; charset=utf-8"


class MetricsServer:
    """Serves /metrics, /health and /ready from one thread of its own running an asyncio loop of its own:
    the tick never waits on a scrape, nor a scrape on a tick, and however many clients connect it stays
    one thread holding at most `max_connections` of them.

    A client has `timeout_s` to send its request (the request line and headers, at most MAX_REQUEST_BYTES)
    and as long to take the answer; then it is cut off. At the limit, a new connection pushes out the one
    that has waited longest for its request, so that connections held open and silent (slow-loris) cannot
    keep a scraper out: Prometheus sends its request as soon as it connects. One request per connection
    (`Connection: close`). Nothing a client does prints a traceback: what is dropped is counted in
    `pi_controller_http_connections_dropped_total`."""

    def __init__(self, metrics: Metrics, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                 timeout_s: float = TIMEOUT_S):
        from prometheus_client import Counter

        self.metrics = metrics
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self.dropped = Counter(f"{PREFIX}_http_connections_dropped_total", "Connections to this server closed "
                               "unanswered: pushed out at the connection limit, too slow, or not a request",
                               ["reason"], registry=metrics.registry)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=max_connections)
        self.address = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet)
        self._closing = asyncio.Event()
        self._open: set[asyncio.StreamWriter] = set()
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # open and without a request yet, oldest first
        self._handlers: set[asyncio.Task[None]] = set()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_listening", host=self.address[0], port=self.address[1])

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._closing.set)
            self._thread.join(max(1.0, self.timeout_s))
        else:
            self._sock.close()
            self._loop.close()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._connection, sock=self._sock, limit=MAX_REQUEST_BYTES)
        async with server:
            await self._closing.wait()
            for writer in list(self._open):
                writer.transport.abort()
            await asyncio.gather(*self._handlers, return_exceptions=True)  # each ends at its cut connection

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
            self._waiting.pop(writer, None)
            writer.write(self._answer(head))
            async with asyncio.timeout(self.timeout_s):
                await writer.drain()
            writer.close()
        except TimeoutError:
            self._drop(writer, "timeout")
        except asyncio.LimitOverrunError:
            writer.write(_response(431, b"request header fields too large\n"))
            writer.close()
            self.dropped.labels("bad_request").inc()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()  # the client went, or was pushed out (and counted then)
        finally:
            self._open.discard(writer)
            self._waiting.pop(writer, None)
            self._handlers.discard(handler)

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Room for `writer`, made by pushing out the longest waiting connection if need be."""
        if len(self._open) >= self.max_connections:
            if not self._waiting:  # all of them being answered: it is the new one that goes
                self._drop(writer, "capacity")
                return False
            oldest = next(iter(self._waiting))
            self._open.discard(oldest)
            del self._waiting[oldest]
            self._drop(oldest, "capacity")
        self._open.add(writer)
        self._waiting[writer] = None
        return True

    def _drop(self, writer: asyncio.StreamWriter, reason: str) -> None:
        writer.transport.abort()
        self.dropped.labels(reason).inc()
        if reason == "capacity" and not self._warned:  # once: the counter says how often since
            self._warned = True
            log.warning("metrics_connection_limit", max_connections=self.max_connections,
                        counted="pi_controller_http_connections_dropped_total")

    def _answer(self, head: bytes) -> bytes:
        request = head.split(b"\r\n", 1)[0].split()
        if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
            self.dropped.labels("bad_request").inc()
            return _response(400, b"not an HTTP/1 request\n")
        method, target = request[0], request[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"GET only\n", headers="Allow: GET, HEAD\r\n")
        try:
            path = urllib.parse.urlsplit(target).path
        except ValueError:  # "http://[::1" and the like
            self.dropped.labels("bad_request").inc()
            return _response(400, b"not a request target\n")
        code, body, content_type = self._route(path)
        return _response(code, body, content_type, head_only=method == b"HEAD")

    def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            try:
                return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST
            # A bug of ours in a collector: a 500 and one line, never a traceback.
            except Exception as exc:
                log.error("metrics_scrape_failed", error=f"{type(exc).__name__}: {exc}")
                return 500, b"scrape failed: see the daemon's log\n", TEXT
        if path == "/health":
            ok = self.metrics.healthy()
            return (200, b"ok\n", TEXT) if ok else (503, b"not ticking on time\n", TEXT)
        if path == "/ready":
            ok, text = self.metrics.ready()
            return 200 if ok else 503, f"{text}\n".encode(), TEXT
        return 404, b"try /metrics, /health or /ready\n", TEXT


def _response(code: int, body: bytes, content_type: str = TEXT, head_only: bool = False, headers: str = "") -> bytes:
    head = (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nServer: pi-controller\r\n"  # no Python version
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What asyncio would print with a traceback (a socket error it met on its own), as one line."""
    log.warning("metrics_server_error", message=context.get("message"), error=repr(context.get("exception")))
