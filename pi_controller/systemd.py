"""systemd's notify protocol, spoken by the loop itself.

The protocol is a few datagrams on the socket named by $NOTIFY_SOCKET, so it is written here rather
than taken from a library (sdnotify, the usual one, has not changed since 2017 and adds nothing).

- READY=1 once the config is valid, pins are set, plugins are loaded and the first tick has run;
- WATCHDOG=1 after ticks that ran on time, at most twice per WatchdogSec: a loop that stalls or keeps
  overrunning stops the pings and systemd restarts the service;
- STATUS= with the tick rate and how many of the folder's plugins loaded, every few seconds;
- on a reload (SIGHUP), systemd's notify-reload protocol: RELOADING=1 with MONOTONIC_USEC= (so that
  systemd knows this reload began after its signal), then READY=1 with STATUS= saying what came of it,
  a refused reload included (Type=notify-reload holds `systemctl reload` until then);
- STOPPING=1 when the loop ends.
Outside systemd (no $NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping

import structlog

from pi_controller.observer import LoopObserver, TickReport

log = structlog.get_logger("pi_controller.systemd")

STATUS_EVERY_S = 5.0


class Notifier(LoopObserver):
    def __init__(self, status: Callable[[], str], environ: Mapping[str, str] = os.environ,
                 timer: Callable[[], float] = time.monotonic):
        self._status = status
        self._timer = timer
        address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._address: str | bytes = address or ""
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        self.ping_every = _ping_interval(environ)
        self._ready = False
        self._last_ping = self._last_status = float("-inf")

    def tick_done(self, report: TickReport) -> None:
        now = self._timer()
        if not self._ready:
            self._ready = True
            self._last_status = now
            self.send(f"READY=1\nSTATUS={_one_line(self._status())}")
            return
        if self.ping_every is not None and report.on_time and now - self._last_ping >= self.ping_every:
            self._last_ping = now
            self.send("WATCHDOG=1")
        if now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            self.send(f"STATUS={_one_line(self._status())}")

    def reloading(self) -> None:
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}\n"
                  "STATUS=reloading the config")

    def reloaded(self, result: str) -> None:
        self.send(f"READY=1\nSTATUS={_one_line(result)}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def send(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:  # systemd gone or the socket full: never a reason to stop controlling
            log.warning("systemd_notify_failed", error=str(exc), message=message.split("\n")[0])

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


def _one_line(text: str) -> str:
    """A newline would end STATUS= and start a field of its own (a config error may quote YAML)."""
    return " ".join(text.split("\n"))


def _address(path: str) -> str | bytes | None:
    if not path:
        return None
    if path.startswith("@"):  # an abstract socket
        return b"\0" + path[1:].encode()
    return path


def _ping_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WatchdogSec, as sd_watchdog_enabled() advises; None when no watchdog is asked of us."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2
