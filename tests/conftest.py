"""Fixtures: configs written to disk, daemons on gpiozero mock pins, the repo's real plugins."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest
import structlog
import yaml
from gpiozero import Device

from pi_controller import config, logs
from pi_controller.clock import Clock, VirtualClock
from pi_controller.config import PluginsSettings
from pi_controller.daemon import Daemon
from pi_controller.devices import pins
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import SandboxedPlugin

REPO = Path(__file__).resolve().parent.parent
BUNDLED_PLUGINS = REPO / "plugins"
TEST_PLUGINS = REPO / "tests" / "plugins"
EXAMPLE_CONFIG = REPO / "config" / "example.yaml"


HOSTILE = ("trap", "endless_loop", "memory_hog", "error_return")  # test plugins that fail every call
CONTEXT = b'{"sensor_readings":[],"device_states":{},"timestamp":1.0,"tick":1'  # the host splices the config in
# 258 bytes that would expand to 10^6 strings through nested aliases (the "billion laughs" of YAML).
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{n}: &{n} [{','.join([f'*{p}'] * 10)}]" for p, n in zip("abcde", "bcdef")]) + "\n"


def sha256_of(path: Path) -> str:
    """The hash a plugin loaded from `path` goes by (`SandboxedPlugin.sha256`)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def only(plugins: PluginSet) -> SandboxedPlugin:
    """The one plugin a set holds."""
    (plugin,) = plugins
    return plugin


def unsimulated(data: dict[str, Any]) -> dict[str, Any]:
    """Config data on mock pins without the simulation models (a test drives the pins itself)."""
    data = dict(data, simulation=[])
    data["pins"] = {"factory": "mock"}
    return data


# Waiting on the loop in real time (hot reload, SIGHUP), shared by the tests that serve a daemon.
WAIT_S = 60.0  # only how long a broken test hangs: nothing here is timed (benchmarks/plugin_reload.py is)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


async def more_ticks(daemon: Any, count: int) -> None:
    """Wait until the loop has run `count` more ticks: time for what a tick would have noticed."""
    target = daemon.loop.ticks.count + count
    await until(lambda: daemon.loop.ticks.count >= target, f"{count} more ticks")


class Held:
    """`owner.method`, each call held where it runs until `release`: held on a worker thread, the loop
    ticks on meanwhile; held on the loop's thread, no tick runs until the wait gives up (`waits` then
    holds False). How a test shows that work is done off the loop, whatever the machine's load."""

    def __init__(self, owner: Any, method: str, monkeypatch: pytest.MonkeyPatch):
        self.entered, self._released = threading.Event(), threading.Event()
        self.waits: list[bool] = []
        work = getattr(owner, method)

        def held(*args: Any) -> Any:
            self.entered.set()
            self.waits.append(self._released.wait(WAIT_S))
            return work(*args)

        monkeypatch.setattr(owner, method, held)

    async def past_ticks(self, daemon: Any, count: int = 3) -> None:
        """Wait for the held call, let the loop run `count` more ticks, then release it (and later calls)."""
        await until(self.entered.is_set, "the held work begins")
        await more_ticks(daemon, count)
        self._released.set()


class PluginsLive:
    """Which plugins were live from which tick on, recorded at each hot-reload swap (`PluginSet.apply`):
    `changes` holds the ticks done before each swap and the plugins live after it (name: sha256), from
    the start. Asserted on instead of missed deadlines, which a loaded machine causes too."""

    def __init__(self, daemon: Any, monkeypatch: pytest.MonkeyPatch):
        self._daemon = daemon
        self.changes = [(daemon.loop.ticks.count, self._live())]
        apply = daemon.plugins.apply

        def recorded(update: Any) -> None:
            apply(update)
            self.changes.append((daemon.loop.ticks.count, self._live()))

        monkeypatch.setattr(daemon.plugins, "apply", recorded)

    def _live(self) -> dict[str, str]:
        return {plugin.name: plugin.sha256 for plugin in self._daemon.plugins}

    def ticks_live(self, name: str) -> int:
        """How many of the ticks run so far had `name` live: each of them called it once, if it ran."""
        ends = [tick for tick, _ in self.changes[1:]] + [self._daemon.loop.ticks.count]
        return sum(end - start for (start, live), end in zip(self.changes, ends) if name in live)

    def versions(self, name: str) -> list[str | None]:
        """`name`'s sha256 from the start and after each swap that changed it (None: not live)."""
        shas = [live.get(name) for _, live in self.changes]
        return [sha for i, sha in enumerate(shas) if i == 0 or sha != shas[i - 1]]


def swaps_of(daemon: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Where the loop ran each reload's swap: the number of ticks done before it, so that tick `n` was
    the first under the new config. What a test asserts on instead of missed deadlines, which a loaded
    machine causes as well as a swap that blocks (benchmarks/plugin_reload.py counts those)."""
    swaps: list[int] = []
    swap = daemon._swap

    def recorded(*args: Any) -> None:
        swaps.append(daemon.loop.ticks.count)
        swap(*args)

    monkeypatch.setattr(daemon, "_swap", recorded)
    return swaps


def run_with(daemon: Any, scenario: Callable[[], Awaitable[None]]) -> None:
    """Serve in real time, play `scenario` beside the ticks, then stop as SIGINT would."""

    async def main() -> None:
        serving = asyncio.create_task(daemon.serve())
        await until(lambda: daemon.loop.ticks.count > 2, "the loop runs")
        try:
            await scenario()
        finally:
            signal.raise_signal(signal.SIGINT)
            await serving

    asyncio.run(main())


# .ci/run's second pass saturates both cores on purpose (PI_CONTROLLER_TESTS_SATURATED=1).
SATURATED = os.environ.get("PI_CONTROLLER_TESTS_SATURATED") == "1"


def assert_no_missed_ticks(missed: int) -> None:
    """Every deadline kept: asserted on a machine with cores to spare. With the cores saturated on
    purpose, a late tick is the machine's doing; everything else a test asserts still holds then."""
    if not SATURATED:
        assert missed == 0, f"{missed} ticks missed"


def skip_unless_ci(reason: str) -> None:
    """Skip for want of a tool a developer may not have; under CI (.ci/run sets CI), fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_data() -> dict[str, Any]:
    """The example config as plain data, for tests to alter; without the heater's minimum on and off
    times, so that tests see plugins act from the first tick (test_safety covers those rules)."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    data["plugins"]["directory"] = str(BUNDLED_PLUGINS)
    heater = next(a for a in data["actuators"] if a["id"] == "relay_switch")
    del heater["min_on_s"], heater["min_off_s"]
    return data


@contextlib.contextmanager
def logging_as_found() -> Iterator[None]:
    """Logging left as it was found: structlog's configuration, and what the tick and the host functions ask before
    building an event (`logs.enabled`), so that the tests after this one log at info."""
    saved, thresholds = structlog.get_config(), (logs._threshold, logs._plugin_threshold, logs._format)
    try:
        yield
    finally:
        structlog.configure(**saved)
        logs._threshold, logs._plugin_threshold, logs._format = thresholds


@contextlib.contextmanager
def logging_at(level: str) -> Iterator[None]:
    """structlog configured as the daemon configures it, at `level`, and left as it was found."""
    with logging_as_found():
        logs.configure("console", level)
        yield


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """Every test leaves logging as it found it: one that runs the CLI in-process (`cli.main` configures logging
    at its --log-level) left `logs.enabled("info")` false for the tests after it in the same worker, and those that
    wait for info events (an actuator_set, say) failed or passed by xdist's draw of tests."""
    with logging_as_found():
        yield


@pytest.fixture
def cli_logs() -> Iterator[None]:
    """Tests that run the CLI in-process leave structlog printing to the stderr pytest captured for them,
    closed by now: log to this test's instead, and leave the configuration as it was found."""
    with logging_at("warning"):
        yield


@pytest.fixture
def write_config(tmp_path: Path):
    """Write config data (a dict, or YAML text) to a file and return its path."""

    def write(data: dict[str, Any] | str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def plugin_dir(tmp_path: Path):
    """A fresh plugins folder holding copies of the named plugins (bundled or test ones)."""

    def make(*names: str) -> Path:
        folder = tmp_path / "plugins"
        folder.mkdir(exist_ok=True)
        for name in names:
            source = BUNDLED_PLUGINS / f"{name}.wasm"
            if not source.exists():
                source = TEST_PLUGINS / f"{name}.wasm"
            shutil.copy(source, folder / f"{name}.wasm")
        return folder

    return make


@pytest.fixture
def run_daemon(write_config) -> Iterator[Any]:
    """Build a daemon on mock pins from config data, run N ticks, return it (closed afterwards)."""
    daemons: list[Daemon] = []

    def run(data: dict[str, Any], ticks: int, *, simulate: bool = True, plugins: Path | None = None,
            clock: Clock | None = None) -> Daemon:
        settings = config.load(write_config(data))
        daemon = Daemon(settings, simulate=simulate, plugins_dir=plugins, clock=clock or VirtualClock())
        daemons.append(daemon)
        if ticks:  # 0: built, plugins loaded, not started (the test serves it itself)
            asyncio.run(daemon.serve(ticks))
        return daemon

    yield run
    for daemon in daemons:
        daemon.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """Where a daemon started with NOTIFY_SOCKET set tells what systemd would hear."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(120)  # only how long a broken test hangs: a saturated machine compiles slowly
    yield sock
    sock.close()


@pytest.fixture(autouse=True, scope="session")
def _lgpio_working_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """lgpio makes its notification FIFO (.lgd-nfy0) in LG_WD, else in its working directory: the checkout, for
    the commands the tests run (`run` without --simulate opens lgpio), which a test then copies whole
    (test_install) and trips on the FIFO. The unit sets LG_WD to its state directory; the tests, to one of theirs."""
    os.environ["LG_WD"] = str(tmp_path_factory.mktemp("lgpio"))


@pytest.fixture(autouse=True)
def _reset_pin_factory() -> Iterator[None]:
    yield
    # `run` and `safe-state` hold their actuators (pins.hold) for a process that leaves through os._exit. A
    # test that ran them in-process goes on: left held, those devices were closed by their __del__ only at the
    # interpreter's exit, after gpiozero's mock module was torn down (a GPIOBase.__del__ traceback each, as
    # pytest's workers exit). Closed here, while their pins are still there to take the change.
    while pins._held:
        pins._held.pop().close()
    if Device.pin_factory is not None:
        Device.pin_factory.reset()
        Device.pin_factory = None


@pytest.fixture
def plugin_set(tmp_path: Path) -> Iterator[Any]:
    """A PluginSet over a fresh folder holding the named plugins, loaded under the given settings."""
    sets: list[PluginSet] = []

    def make(*names: str, manifests: dict[str, dict[str, Any]] | None = None, **settings: Any) -> PluginSet:
        folder = tmp_path / "plugins"
        folder.mkdir(exist_ok=True)
        for name in names:
            shutil.copy(plugin_wasm(name), folder / f"{name}.wasm")
        for name, manifest in (manifests or {}).items():
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
        # On a virtual clock: the wall-clock backstop is then 10 s, so nothing here depends on the load.
        plugins = PluginSet(PluginsSettings(**settings), folder, budget_ms=1000, clock=VirtualClock())
        plugins.load_all()
        sets.append(plugins)
        return plugins

    yield make
    for plugins in sets:
        plugins.close()


def plugin_wasm(name: str) -> Path:
    """A plugin of the repository by name: bundled, an example, or a test plugin."""
    for folder in (BUNDLED_PLUGINS, BUNDLED_PLUGINS / "examples"):
        if (folder / f"{name}.wasm").exists():
            return folder / f"{name}.wasm"
    return TEST_PLUGINS / f"{name}.wasm"
