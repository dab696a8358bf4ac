"""The metrics server under hostile clients: bounded in threads, connections, time and bytes; never a traceback.

Against 127.0.0.1 only; every wait is for a condition (the server's own counters, a connection closing), with
a socket timeout only as the bound on how long a broken test hangs.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from pi_controller.metrics import MetricsServer
from tests.test_mqtt import poll

HANG_S = 60  # only how long a broken test hangs


class FakeMetrics:
    """What the server reads of `Metrics`."""

    def __init__(self, exposition: Callable[[CollectorRegistry], bytes] = generate_latest):
        self.registry = CollectorRegistry()
        self._exposition = exposition

    def exposition(self) -> bytes:
        return self._exposition(self.registry)

    def healthy(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, "ok: 1 of 1 plugins loaded"


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    """Starts a server on a free port of 127.0.0.1 (`metrics`: a FakeMetrics by default), closed after the test."""
    with contextlib.ExitStack() as started:
        def start(metrics: Any = None, **limits: Any) -> MetricsServer:
            server = MetricsServer(metrics or FakeMetrics(), "127.0.0.1", 0, **limits)
            server.start()
            started.callback(server.close)
            return server

        yield start


def dropped(server: MetricsServer, reason: str) -> float:
    return server.dropped.labels(reason)._value.get()


def get(server: MetricsServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}{path}", timeout=HANG_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def exchange(server: MetricsServer, request: bytes) -> bytes:
    """What the server answers to `request` before it closes the connection."""
    with socket.create_connection(server.address, timeout=HANG_S) as client:
        client.sendall(request)
        return b"".join(iter(lambda: client.recv(65536), b""))


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for a thousand client sockets in this process, whatever the shell's soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if wanted < 1200:
        pytest.skip(f"the hard limit on open files ({hard}) leaves no room for a thousand connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_slow_connections_cost_no_thread_and_a_scrape_still_gets_through(serve, many_fds, capfd) -> None:
    with capture_logs() as events:
        server = serve()
        assert get(server, "/health") == (200, b"ok\n")
        capfd.readouterr()  # what starting it said, however logging is set up in this process
        threads = threading.active_count()
        slow = []
        try:
            for _ in range(1000):  # slow-loris: a request begun, never finished
                client = socket.create_connection(server.address, timeout=HANG_S)
                client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                slow.append(client)
            poll(lambda: dropped(server, "capacity") >= 1000 - server.max_connections, "the slow ones pushed out")
            assert threading.active_count() <= threads
            assert get(server, "/metrics")[0] == 200  # pushes out the longest waiting slow one
            for client in slow[-20:]:  # and some reset the connection (RST, not FIN)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            assert get(server, "/ready") == (200, b"ok: 1 of 1 plugins loaded\n")
        finally:
            for client in slow:
                client.close()
        assert threading.active_count() <= threads
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [e["event"] for e in events if e["log_level"] != "info"] == ["metrics_connection_limit"]


def test_a_silent_connection_is_cut_after_the_timeout_and_counted(serve) -> None:
    server = serve(timeout_s=0.2)
    with socket.create_connection(server.address, timeout=HANG_S) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert client.recv(100) == b""  # closed by the server, unanswered
    poll(lambda: dropped(server, "timeout") == 1, "the silent one counted")
    assert get(server, "/health") == (200, b"ok\n")


def test_a_client_that_never_reads_its_answer_is_cut_after_the_timeout(serve) -> None:
    big = b"# " + b"x" * (32 << 20) + b"\n"  # far more than the sockets' buffers hold
    server = serve(FakeMetrics(lambda registry: big), timeout_s=0.2)
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(HANG_S)
        client.connect(server.address)
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        poll(lambda: dropped(server, "timeout") == 1, "the one that never reads cut off")
        received = 0
        try:
            while chunk := client.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert received < len(big)  # cut short: the body never came whole


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),  # TLS to a plain HTTP port
    (b"GET http://[::1/metrics HTTP/1.1\r\n\r\n", b"400"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
    (b"GET /nope HTTP/1.0\r\n\r\n", b"404"),
])
def test_a_bad_request_gets_one_short_answer(serve, capfd, request_bytes, status) -> None:
    server = serve()
    capfd.readouterr()  # what starting it said
    with capture_logs() as events:
        answer = exchange(server, request_bytes)
    assert answer.split(b" ", 2)[1] == status and len(answer) < 300
    assert not events and capfd.readouterr().err == ""


def test_head_answers_the_headers_alone(serve) -> None:
    answer = exchange(serve(), b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nServer: pi-controller\r\n" in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 0 and body == b""


def test_a_collector_that_raises_is_a_500_and_one_line_not_a_traceback(serve, capfd) -> None:
    def broken(registry: CollectorRegistry) -> bytes:
        raise KeyError("plugin_statuses changed during iteration")

    server = serve(FakeMetrics(broken))
    capfd.readouterr()  # what starting it said
    with capture_logs() as events:
        assert get(server, "/metrics")[0] == 500
        assert get(server, "/health") == (200, b"ok\n")
    (failed,) = [e for e in events if e["event"] == "metrics_scrape_failed"]
    assert "KeyError" in failed["error"] and "exc_info" not in failed
    assert capfd.readouterr().err == ""


def test_the_daemon_under_a_thousand_slow_connections_keeps_its_threads_and_prints_only_events(
        tmp_path, many_fds) -> None:
    import json
    import signal
    from pathlib import Path

    from tests.conftest import free_port
    from tests.test_service import fetch, samples, service_config, start, wait_for_event

    port = free_port()
    process = start(service_config(tmp_path, metrics={"enabled": True, "port": port}), None)
    url = f"http://127.0.0.1:{port}"

    def status(field: str) -> int:  # Threads, or VmRSS in kB
        return int(Path(f"/proc/{process.pid}/status").read_text().split(f"\n{field}:")[1].split()[0])

    slow: list[socket.socket] = []
    try:
        wait_for_event(process, "metrics_listening")
        poll(lambda: fetch(f"{url}/ready")[0] == 200, "ready")
        threads, rss_kb = status("Threads"), status("VmRSS")
        for _ in range(1000):
            client = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
            client.sendall(b"GET /metrics HTTP/1.1\r\n")
            slow.append(client)
        capacity = ("pi_controller_http_connections_dropped_total", (("reason", "capacity"),))
        poll(lambda: samples(fetch(f"{url}/metrics")[1])[capacity] >= 1000 - 16, "scraped, the slow ones pushed out")
        assert status("Threads") <= threads  # not one more thread for a thousand connections
        assert status("VmRSS") < rss_kb + 16 * 1024  # a thread each cost 27 MB here
        for client in slow[-20:]:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        assert fetch(f"{url}/health") == (200, "ok\n")
    finally:
        for client in slow:
            client.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    events = [json.loads(line) for line in stderr.splitlines()]  # every line an event: no traceback
    assert not [e for e in events if "exception" in e]
    assert [e["event"] for e in events if e["event"].startswith("metrics_") and e["level"] != "info"] == [
        "metrics_connection_limit"]  # (on a loaded machine, a tick_overrun or two besides)
