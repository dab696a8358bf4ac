"""Home Assistant's view of the daemon, from the broker's side, after every step of sequences of events:
scripted (`SEQUENCES`) and drawn by hypothesis (`EntitiesMachine`, on a fixed budget).

The events: plugins dropped in, replaced, removed; the folder deleted and recreated; shadows put in and taken
out; SIGHUP reloads that add, remove, rename and change the kind of actuators and sensors, or switch a plugin
off; a plugin quarantined and released; the operator's switch and config values (a thermostat's thermometer);
the broker restarted, keeping or forgetting what it retained, with changes meanwhile; the daemon restarted
with another config (devices, plugins, read-only, discovery off; another node id, base topic or discovery
prefix), across a broker outage too, or with a new state directory; another version of a plugin rolled out by
the fleet tool; commands for actuators and plugins it does not run (each refused).

The invariant: nothing is retained where the daemon does not publish now (the places it had before included), and
the broker retains exactly the discovery configs the daemon would send now (and one entity
of the right platform per device and plugin the test put there), a state for each sensor, actuator and
plugin that runs and none other, each saying what the daemon's status says; every topic an entity reads is
retained; metrics name no plugin, actuator or sensor that is gone (a shadow's series stay while it runs).

The daemon is the real one on a `daemon_rig.Rig` (mock pins, ticks granted one at a time), talking to a real
mosquitto (with persistence); what the broker retains is read by a fresh paho client each time, as Home
Assistant finds it when it starts. After each step the rig ticks until the invariant holds (the daemon owes
the broker its view within a few ticks), within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import pytest
import yaml
from asyncinotify import Inotify, Mask
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pi_controller.fleet import protocol, tool
from pi_controller.mqtt import discovery
from pi_controller.operator import EnablePlugin, SetPluginConfig
from pi_controller.plugins.signing import SUFFIX, sign
from pi_controller.plugins.signing_cli import public_pem
from tests.conftest import TEST_PLUGINS
from tests.daemon_machine import MODULES, Manifest, quiet_logs
from tests.daemon_rig import Rig
from tests.test_mqtt import MOSQUITTO, Broker

pytestmark = pytest.mark.skipif(not MOSQUITTO, reason="needs mosquitto's persistence across its restart")

NODE = "entities"
BASE = f"pi-controller/{NODE}"
PREFIX = "homeassistant"
PLATFORMS = {"relay": "switch", "pwm": "light", "servo": "number", "motion": "binary_sensor",
             "button": "binary_sensor", "ds18b20": "sensor"}
READ_ONLY = {"switch": "binary_sensor", "light": "binary_sensor", "number": "sensor"}  # without commands
CONVERGE_TICKS = 60  # the daemon owes the broker its view within this many ticks of a step
PROBE_WAIT_S = 30.0
LINK_WAIT_S = 90.0  # only how long a broken link hangs the test: paho's back-off after an outage, under load
AWAY_TICKS = 60  # past the heartbeat (5 s at 10 Hz)  # only how long a broken broker hangs a read
ROLLOUT_TICKS = 1000  # only how long a broken rollout hangs the test (the node's own bound for a swap is 300)
ROLLED_OUT = (TEST_PLUGINS / "echo_output.wasm").read_bytes()  # what a rollout brings: quiet, no config


@dataclass(frozen=True)
class Device:
    kind: str
    pin: int | None = None  # None: a DS18B20 on the 1-wire files


Devices = Mapping[str, Device]
FIRST_ACTUATORS: Devices = {"heater": Device("relay", 27), "lamp": Device("pwm", 18)}
FIRST_SENSORS: Devices = {"presence": Device("motion", 17), "probe": Device("ds18b20")}


@dataclass(frozen=True)
class ThermostatManifest:
    """The switchboard as a thermostat (a climate entity): its thermometer, heater and target in its config."""

    sensor: str = "probe"

    def text(self, name: str) -> str:
        return yaml.safe_dump({"version": "1.0.0", "config_schema": {
            "mode": {"type": "string", "allowed": ["on", "off", "trap"]}, "device": {"type": "string"},
            "sensor": {"type": "string"}, "target": {"type": "number", "min": 5, "max": 30}},
            "config": {"mode": "off", "device": "heater", "sensor": self.sensor, "target": 21},
            "thermostat": {"current": "sensor", "heater": "device", "target": "target"}})


def lamp_plugin(**config: Any) -> Manifest:
    return Manifest(config={"mode": "on", "device": "lamp", "duty": 30, **config})


def retained(port: int) -> dict[str, bytes]:
    """What the broker retains, under every topic, as a new subscriber gets it: the retained messages a
    subscription brings come before a message published after its acknowledgement."""
    found: dict[str, bytes] = {}
    marker = f"probe/{uuid.uuid4().hex}"
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}")

    def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == marker:
            done.set()
        elif message.retain:
            found[message.topic] = bytes(message.payload)

    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", 1)
    client.on_subscribe = lambda c, u, mid, codes, p: c.publish(marker, b".", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not done.wait(PROBE_WAIT_S):
            raise AssertionError(f"the broker on {port} never answered the probe")
    finally:
        client.disconnect()
        client.loop_stop()
    return found


@dataclass
class Scene:
    """One daemon, one broker, and what the test put where: the devices of the config on disk, the plugins
    of the folder."""

    root: Path
    broker: Broker
    actuators: Devices = field(default_factory=lambda: dict(FIRST_ACTUATORS))
    sensors: Devices = field(default_factory=lambda: dict(FIRST_SENSORS))
    plugins: dict[str, Manifest | ThermostatManifest | None] = field(default_factory=dict)
    mqtt: dict[str, Any] = field(default_factory=dict)  # mqtt settings beyond the scene's own
    running: dict[str, Any] = field(default_factory=dict)  # those the daemon started with (a reload keeps them)
    disabled: frozenset[str] = frozenset()  # plugins the config switches off (plugins.settings.<name>.enabled)
    owner: Ed25519PrivateKey | None = None  # with it, the node takes fleet rollouts signed by it (`rollout`)
    state_dir: Path | None = None  # the daemon's (`run --state-dir`)
    rig: Rig | None = None

    @property
    def folder(self) -> Path:
        return self.root / "plugins"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def place(self) -> tuple[str, str, str]:
        """Where the daemon publishes: its topics' base, its discovery prefix, its node id."""
        node = self.running.get("node_id", NODE)
        return f"{self.running.get('base_topic', 'pi-controller')}/{node}", \
            self.running.get("discovery_prefix", PREFIX), node

    # -- set up -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.folder.mkdir()
        self._write_config()
        self.rig = Rig(self.config_path, {}, state_dir=self.state_dir)
        self.running = dict(self.mqtt)
        self.rig.start()
        self.rig.finish()
        self.agree("the start")

    def stop(self) -> None:
        if self.rig is not None:
            self.rig.close()
            self.rig = None

    def _write_config(self) -> None:
        sensors = [{"id": i, "kind": d.kind, "pin": d.pin} if d.pin is not None else self._thermometer(i)
                   for i, d in self.sensors.items()]
        data: dict[str, Any] = {
            "loop": {"rate_hz": 10, "plugin_budget": 0.6},
            "pins": {"factory": "mock"},
            "sensors": sensors,
            "actuators": [{"id": i, "kind": d.kind, "pin": d.pin} for i, d in self.actuators.items()],
            "watchdog": {"enabled": False},  # it keeps real time: the rig's ticks are virtual
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": self.broker.port, "node_id": NODE,
                     "max_messages_per_s": 10_000, "heartbeat_s": 5, **self.mqtt},
            "plugins": {"directory": "plugins", "defaults": {"timeout_ms": 10},
                        "quarantine": {"failures": 10, "window_s": 10, "backoff_s": 3, "max_backoff_s": 30},
                        "settings": {name: {"enabled": False} for name in sorted(self.disabled)}},
        }
        if self.owner is not None:
            (self.root / "owner.pub").write_bytes(public_pem(self.owner.public_key()))
            data["mqtt"]["fleet"] = True
            data["plugins"]["trusted_keys"] = [str(self.root / "owner.pub")]
        partial = self.config_path.with_suffix(".partial")
        partial.write_text(yaml.safe_dump(data, sort_keys=False))
        partial.replace(self.config_path)

    def _thermometer(self, sensor_id: str) -> dict[str, Any]:
        """A DS18B20 of its own, reading 20.123 °C (a value the wire rounds)."""
        w1_id = f"28-{sensor_id.encode().hex()[:12]:0>12}"
        w1 = self.root / "w1" / w1_id / "w1_slave"
        w1.parent.mkdir(parents=True, exist_ok=True)
        w1.write_text("00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t=20123\n")
        return {"id": sensor_id, "kind": "ds18b20", "device": w1_id, "base_dir": str(self.root / "w1"),
                "poll_interval_s": 0}

    # -- events -----------------------------------------------------------------------------------

    def drop(self, name: str, manifest: Manifest | ThermostatManifest | None = None) -> None:
        """A plugin dropped in (or replaced), manifest first, each file renamed into place."""
        self.folder.mkdir(exist_ok=True)
        staging = self.root / "staging"
        staging.mkdir(exist_ok=True)
        if manifest is not None:
            (staging / f"{name}.yaml").write_text(manifest.text(name))
            (staging / f"{name}.yaml").replace(self.folder / f"{name}.yaml")
        else:
            (self.folder / f"{name}.yaml").unlink(missing_ok=True)
        (self.folder / f"{name}{SUFFIX}").unlink(missing_ok=True)  # a rollout's signature, of another module
        (staging / f"{name}.wasm").write_bytes(MODULES["switchboard"])
        (staging / f"{name}.wasm").replace(self.folder / f"{name}.wasm")
        self.plugins[name] = manifest
        self._finish(f"{name} dropped in")

    def shadow(self, name: str, manifest: Manifest | ThermostatManifest | None) -> None:
        """A shadow plugin of `name` put beside it (None: taken out)."""
        folder = self.folder / "shadow"
        folder.mkdir(exist_ok=True)
        if manifest is None:
            for suffix in (".wasm", ".yaml"):
                (folder / f"{name}{suffix}").unlink(missing_ok=True)
        else:
            (folder / f"{name}.yaml").write_text(manifest.text(name))
            (self.root / "staging").mkdir(exist_ok=True)
            (self.root / "staging" / f"{name}.wasm").write_bytes(MODULES["switchboard"])
            (self.root / "staging" / f"{name}.wasm").replace(folder / f"{name}.wasm")
        self._finish(f"a shadow of {name} {'taken out' if manifest is None else 'put in'}")

    def remove(self, name: str) -> None:
        self._unlink(name)
        self._finish(f"{name} removed")

    def _unlink(self, name: str) -> None:
        (self.folder / f"{name}.wasm").unlink()
        (self.folder / f"{name}.yaml").unlink(missing_ok=True)
        (self.folder / f"{name}{SUFFIX}").unlink(missing_ok=True)
        del self.plugins[name]

    def delete_folder(self) -> None:
        shutil.rmtree(self.folder)
        self._finish("the folder deleted")

    def recreate_folder(self) -> None:
        plugins, self.plugins = self.plugins, {}
        for name, manifest in plugins.items():
            self.drop(name, manifest)

    def reload(self, actuators: Devices | None = None, sensors: Devices | None = None,
               disabled: frozenset[str] | None = None, **mqtt: Any) -> None:
        """The config rewritten with these devices (and plugins switched off, and `mqtt` settings, which wait for a
        restart), then SIGHUP."""
        assert self.rig is not None and self.rig.daemon is not None
        self.mqtt |= mqtt
        self.actuators, self.sensors = dict(actuators or self.actuators), dict(sensors or self.sensors)
        self.disabled = self.disabled if disabled is None else disabled
        self._write_config()
        last = self.rig.daemon.status.last_reload
        self.rig.sighup()
        self.rig.finish()
        result = self.rig.daemon.status.last_reload
        assert result is not None and result is not last and result.outcome == "applied", result
        self.agree("a reload")

    def restart(self, actuators: Devices | None = None, sensors: Devices | None = None, gone: tuple[str, ...] = (),
                state_dir: Path | None = None, **mqtt: Any) -> None:
        """The daemon stopped (SIGTERM), the plugins `gone` taken out of the folder, the config rewritten
        (with `mqtt` settings), started again (with another `state_dir`, if given)."""
        assert self.rig is not None
        self.rig.stop()
        for name in gone:
            self._unlink(name)
        self.mqtt |= mqtt
        self.actuators, self.sensors = dict(actuators or self.actuators), dict(sensors or self.sensors)
        self._write_config()
        if state_dir is not None:
            self.state_dir = self.rig.state_dir = state_dir
        self.running = dict(self.mqtt)
        self.rig.start()
        self._finish("a restart")

    def rollout(self, name: str) -> None:
        """Another version of `name` (another module, no config) rolled out to this node by the owner's tool:
        its chunks and announcement retained, ticked until the node's part ended (live, or refused), then
        cleared from the broker. The scene's record of the plugin stays: a drop puts the switchboard back."""
        assert self.owner is not None
        folder = self.root / "rollout"
        folder.mkdir(exist_ok=True)
        wasm = folder / f"{name}.wasm"
        wasm.write_bytes(ROLLED_OUT)
        (folder / f"{name}.yaml").write_text('version: "9.0.0"\n')
        wasm.with_suffix(SUFFIX).write_text(sign(name, ROLLED_OUT, b'version: "9.0.0"\n', self.owner).text())
        base, _, node = self.place
        site = tool.Broker("127.0.0.1", self.broker.port, base.rsplit("/", 1)[0])
        a, module = tool.announce(wasm, tool.Plan((node,), site, shadow_ticks=10, live_ticks=10))
        a = replace(a, rollout=uuid.uuid4().hex)  # the tool's id changes once a second
        chunks = [protocol.chunk_topic(site.base_topic, a.sha256, i) for i in range(a.chunks)]
        owner = tool.Watcher(site, name)
        try:
            for index, topic in enumerate(chunks):
                owner.publish(topic, module[index * protocol.CHUNK_BYTES:(index + 1) * protocol.CHUNK_BYTES])
            owner.publish(protocol.rollout_topic(site.base_topic, name), a.payload())
            self._tick_until(lambda: self._rollout_ended(name, a.rollout), f"the rollout of {name} ended",
                             ROLLOUT_TICKS)
            for topic in [*chunks, protocol.rollout_topic(site.base_topic, name)]:
                owner.publish(topic, b"")
        finally:
            owner.close()
        self._finish(f"a rollout of {name}")

    def _rollout_ended(self, name: str, rollout: str) -> bool:
        node = self._daemon().telemetry.fleet
        return name in node.rollouts and node.rollouts[name].announcement.rollout == rollout \
            and node.rollouts[name].ended

    def quarantine(self, name: str) -> None:
        """Its mode set to trap by the operator, ticks until the daemon quarantines it."""
        daemon = self._daemon()
        daemon.operator.submit(SetPluginConfig(name, "mode", "trap", ""))
        self._tick_until(lambda: daemon.plugins.status[name].state == "quarantined", f"{name} quarantined")
        self.agree(f"{name} quarantined")

    def release(self, name: str, mode: str = "on") -> None:
        """Its mode set back by the operator (to one whose commands are taken), ticks until its quarantine ends
        (relapses rest longer: up to max_backoff_s, 30 s)."""
        daemon = self._daemon()
        daemon.operator.submit(SetPluginConfig(name, "mode", mode, ""))
        self._tick_until(lambda: daemon.plugins.status[name].state == "loaded", f"{name} released", 400)
        self.agree(f"{name} released")

    def configure(self, name: str, key: str, value: Any) -> None:
        """A config value of a plugin set by the operator (over MQTT or Home Assistant)."""
        self._daemon().operator.submit(SetPluginConfig(name, key, value, ""))
        self._finish(f"{name}'s {key} set to {value!r}")

    def switch(self, name: str, enabled: bool) -> None:
        self._daemon().operator.submit(EnablePlugin(name, enabled, ""))
        self._finish(f"{name} switched {'on' if enabled else 'off'}")

    def broker_restart(self, meanwhile: Callable[[], None] = lambda: None, forgets: bool = False,
                       crashes: bool = False) -> None:
        """The broker stopped (its retained messages saved, or lost if it `forgets`; if it `crashes`, killed: what
        it retains is what its last autosave had, and no will is said), `meanwhile` done while it is away, started
        again."""
        link = self._daemon().telemetry.link
        assert self.rig is not None and self.broker.process is not None
        if crashes:
            self.broker.process.kill()
            self.broker.process.wait()
            self.broker.process = None
        self.broker.stop()
        if forgets:
            (self.root / "mosquitto.db").unlink(missing_ok=True)  # a crash may come before the first autosave
        deadline = time.monotonic() + LINK_WAIT_S
        while link.connected():  # paho's thread sees the connection close
            self.rig.tick()
            assert time.monotonic() < deadline, "the daemon never saw the broker go"
        self.rig.ticks(AWAY_TICKS)  # every state heartbeats into the outage buffer
        meanwhile()
        self.rig.ticks(AWAY_TICKS)
        self.broker.start()
        link = self._daemon().telemetry.link  # another daemon's, if `meanwhile` restarted it
        assert link._connected.wait(LINK_WAIT_S), "the daemon never reconnected"  # paho's back-off is real time
        self.agree("the broker's restart")

    def autosaved(self) -> None:
        """The broker made to save what it retains now (SIGUSR1, what its autosave does every second), waited for
        as the file lands (inotify): what a crash brings back."""
        assert self.broker.process is not None
        pid = self.broker.process.pid

        async def saved() -> None:
            with Inotify() as inotify:
                inotify.add_watch(self.root, Mask.MOVED_TO | Mask.CLOSE_WRITE)
                os.kill(pid, signal.SIGUSR1)
                async for event in inotify:
                    if event.name == Path("mosquitto.db"):
                        return

        asyncio.run(asyncio.wait_for(saved(), LINK_WAIT_S))  # only how long a broken test waits

    def ask(self, command: str, payload: bytes) -> dict[str, Any]:
        """`payload` published on `<base>/<command>` by a client of its own, as Home Assistant or an automation
        does; the answer on the command's `/result`, ticked for until it comes."""
        answers: list[bytes] = []
        subscribed, answered = threading.Event(), threading.Event()
        topic = f"{self.place[0]}/{command}"

        def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
            answers.append(bytes(message.payload))
            answered.set()

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"asker-{uuid.uuid4().hex[:8]}")
        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{topic}/result", 1)
        client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        try:
            assert subscribed.wait(PROBE_WAIT_S), "the broker never acknowledged the subscription to the result"
            client.publish(topic, payload, qos=1).wait_for_publish(PROBE_WAIT_S)
            deadline = time.monotonic() + PROBE_WAIT_S
            while not answered.wait(0.01):  # the command crosses the broker in real time, the ticks are the rig's
                assert self.rig is not None and time.monotonic() < deadline, f"no answer on {topic}/result"
                self.rig.tick()
                self.rig.settle()
        finally:
            client.disconnect()
            client.loop_stop()
        return dict(json.loads(answers[0]))

    def home_assistant_restarts(self) -> None:
        """Home Assistant's birth message, as it says it at its start: `online` on `homeassistant/status`."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"home-assistant-{uuid.uuid4().hex[:8]}")
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        try:
            client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(PROBE_WAIT_S)
        finally:
            client.disconnect()
            client.loop_stop()
        self._finish("Home Assistant's restart")

    # -- the invariant ----------------------------------------------------------------------------

    def _daemon(self) -> Any:
        assert self.rig is not None and self.rig.daemon is not None
        return self.rig.daemon

    def _finish(self, after: str) -> None:
        assert self.rig is not None
        self.rig.finish()
        self.agree(after)

    def _tick_until(self, condition: Callable[[], bool], what: str, ticks: int = 100) -> None:
        assert self.rig is not None
        for _ in range(ticks):
            if condition():
                return
            self.rig.tick()
            self.rig.settle()
        raise AssertionError(f"not within {ticks} ticks: {what}")

    def agree(self, after: str) -> None:
        """Tick until the broker retains exactly what the daemon runs (and metrics name nothing else);
        past the bound, what disagrees."""
        assert self.rig is not None
        if self.broker.process is None:  # away: nothing to read; what the daemon owes, it owes at reconnecting
            return
        problems: list[str] = []
        for _ in range(CONVERGE_TICKS):
            self.rig.tick()
            self.rig.settle()
            telemetry = self._daemon().telemetry
            if not telemetry.link.connected() or telemetry.outbox.waiting():
                continue
            problems = self.disagreements(retained(self.broker.port))
            if not problems:
                return
        raise AssertionError(f"after {after}, {CONVERGE_TICKS} ticks on:\n  " + "\n  ".join(problems or
                                                                                          ["never connected"]))

    def disagreements(self, broker: dict[str, bytes]) -> list[str]:
        daemon = self._daemon()
        status = daemon.status
        base, prefix, node = self.place
        # Nothing retained where this node no longer publishes (an id, base or prefix it had before). The owner's
        # rollouts are the owner tool's to empty: a crash of the broker may bring its emptied chunks back.
        site = f"{base.rsplit('/', 1)[0]}/fleet/"
        problems = [f"retained where the node does not publish: {t}" for t in sorted(broker)
                    if not t.startswith((f"{base}/", site)) and not _config_of(t, prefix, node)]
        # Discovery: the configs of what runs, each as the daemon would send it now, and nothing else.
        discovering = self.running.get("discovery", True)
        now = {t: c for t, c in discovery.configs(status.settings, status.config_schemas(), status.shadowed(),
                                                  status.thermostats()).items() if c and discovering}
        shown = {t: json.loads(p) for t, p in broker.items() if _config_of(t, prefix, node)}
        problems += [f"left over: {t}" for t in sorted(set(shown) - set(now))]
        problems += [f"missing: {t}" for t in sorted(set(now) - set(shown))]
        problems += [f"stale config: {t}" for t in sorted(set(now) & set(shown)) if now[t] != shown[t]]
        # ... and what the test put there, by kind, whatever the daemon thinks it runs.
        for object_id, device in {**self.actuators, **self.sensors}.items() if discovering else ():
            platform = PLATFORMS[device.kind]
            platform = platform if self.running.get("commands", True) else READ_ONLY.get(platform, platform)
            if f"{prefix}/{platform}/{node}/{object_id}/config" not in shown:
                problems.append(f"{object_id} ({device.kind}) has no {platform} entity")
        for name in self.plugins if self.folder.is_dir() and discovering else ():
            if f"{prefix}/sensor/{node}/plugin_{name}/config" not in shown:
                problems.append(f"plugin {name} has no entity")
        # Each entity reads states the broker holds (an event entity's come and go).
        problems += [f"{t} reads {read}, which nothing publishes" for t, c in sorted(shown.items())
                     if not t.startswith(f"{prefix}/event/") for read in _read(c) if read not in broker]
        problems += self._states(broker, status)
        problems += self._series(daemon)
        return problems

    def _states(self, broker: dict[str, bytes], status: Any) -> list[str]:
        """The retained states: one per sensor, actuator and plugin of now, each saying what status says."""
        problems = []
        # (A rollout's verdicts, `fleet/<plugin>`, are the node's word to the owner's tool, kept for it.)
        base = self.place[0]
        states = {t[len(base) + 1:]: json.loads(p) for t, p in broker.items() if t.startswith(f"{base}/")
                  and t not in (f"{base}/status", f"{base}/instance", f"{base}/loop/state", f"{base}/telemetry/state")
                  and not t.startswith(f"{base}/fleet/")}
        expected = {f"sensor/{s.id}/state" for s in status.settings.sensors}
        expected |= {f"actuator/{a.id}/state" for a in status.settings.actuators}
        expected |= {f"plugin/{name}/state" for name in status.plugin_states()}
        problems += [f"retained state left over: {t}" for t in sorted(set(states) - expected)]
        problems += [f"no retained state: {t}" for t in sorted(expected - set(states))]
        for name, plugin in status.plugin_states().items():
            shown = states.get(f"plugin/{name}/state", {})
            if (shown.get("state"), shown.get("enabled")) != (plugin["state"], plugin["enabled"]):
                problems.append(f"plugin {name} shown {shown.get('state')}, enabled {shown.get('enabled')}; "
                                f"status says {plugin['state']}, enabled {plugin['enabled']}")
            for key in ("sha256", "candidate", "rollout"):  # what its update entity shows
                if shown.get(key) != plugin[key]:
                    problems.append(f"plugin {name} shown {key} {shown.get(key)}; status says {plugin[key]}")
        decimals = {sensor.id: sensor.decimals() for sensor in status.settings.sensors}
        for reading in status.readings():
            shown = states.get(f"sensor/{reading.sensor_id}/state", {})
            now = reading.as_json(decimals[reading.sensor_id])
            if (shown.get("value"), shown.get("valid")) != (now["value"], now["valid"]):
                problems.append(f"sensor {reading.sensor_id} shown {shown}; status says {now}")
        for device, state in status.actuator_states().items():
            shown = states.get(f"actuator/{device}/state", {})
            if {k: shown.get(k) for k in state} != state:
                problems.append(f"actuator {device} shown {shown}; status says {state}")
        return problems

    def _series(self, daemon: Any) -> list[str]:
        """Metrics: no series of a plugin, actuator or sensor that is gone."""
        assert self.rig is not None
        text = self.rig.readiness.exposition().decode()
        named = {("plugin", n) for n in re.findall(r'plugin="([^"]+)"', text)}
        named |= {("device", n) for n in re.findall(r'device="([^"*]+)"', text)}
        named |= {("sensor", n) for n in re.findall(r'sensor="([^"]+)"', text)}
        status = daemon.status
        running = {("plugin", n) for n in status.plugin_statuses()} | {("device", a) for a in status.actuator_ids()}
        running |= {("plugin", p.name) for p in status.shadows.plugins}  # a shadow runs on without its plugin
        running |= {("sensor", s.id) for s in status.settings.sensors}
        return [f"metrics name a {kind} gone: {name}" for kind, name in sorted(named - running)]


def _config_of(topic: str, prefix: str, node: str) -> bool:
    """A discovery config of the node `node` under the prefix `prefix`."""
    parts = topic.split("/")
    return parts[0] == prefix and len(parts) == 5 and parts[2] == node and parts[4] == "config"


def _read(config: Mapping[str, Any]) -> set[str]:
    """The topics an entity's config reads: its state's, its attributes', its availability's."""
    topics = {v for k, v in config.items() if k.endswith("_topic") and "command" not in k}
    return topics | {a["topic"] for a in config.get("availability", [])}


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    broker = Broker(tmp_path)
    broker.start()
    with quiet_logs():
        scene = Scene(tmp_path, broker, owner=Ed25519PrivateKey.generate())
        try:
            yield scene
        finally:
            scene.stop()
            broker.stop()


def plugins_come_and_go(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.drop("stray", lamp_plugin(mode="silent"))
    s.drop("lamp_ctl", None)  # replaced by the same module without a manifest: no config entities
    s.remove("stray")
    s.delete_folder()
    s.recreate_folder()


def reloads_change_the_devices(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.reload(actuators={**FIRST_ACTUATORS, "vent": Device("servo", 13)}, sensors={"presence": Device("motion", 17)})
    s.reload(actuators={"boiler": Device("relay", 27), "lamp": Device("pwm", 18), "vent": Device("servo", 13)},
             sensors={"presence": Device("motion", 17), "door": Device("button", 23)})  # heater renamed boiler
    s.reload(actuators={"boiler": Device("pwm", 27), "lamp": Device("pwm", 18)},  # a relay turned into a PWM output
             sensors={"presence": Device("motion", 17), "probe": Device("ds18b20")})
    s.reload(sensors={"presence": Device("ds18b20"), "probe": Device("motion", 23)})  # each the other's kind


def quarantine_and_the_operator(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.switch("lamp_ctl", False)
    s.switch("lamp_ctl", True)
    s.reload(disabled=frozenset({"lamp_ctl"}))  # the config switches it off: no config entities
    s.reload(disabled=frozenset())
    s.quarantine("lamp_ctl")
    s.release("lamp_ctl")


def changes_while_the_broker_is_away(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.drop("stray", lamp_plugin())
    s.drop("hog", lamp_plugin())

    def meanwhile() -> None:
        s.remove("stray")
        s.reload(actuators={"lamp": Device("pwm", 18)}, sensors={"presence": Device("motion", 17)})

    s.broker_restart(meanwhile, forgets=True)  # what went must not come back from the outage buffer
    s.broker_restart(lambda: s.remove("hog"))  # what went must go from what the broker kept
    s.broker_restart(forgets=True)  # everything sent again


def a_restart_with_another_config(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.drop("stray", lamp_plugin())
    s.restart(actuators={"boiler": Device("pwm", 27), "lamp": Device("relay", 18)},  # renamed; a PWM turned relay
              sensors={"presence": Device("motion", 17)}, gone=("stray",))


def an_outage_across_a_restart(s: Scene) -> None:
    """The broker away while the daemon stops (its outage buffer kept in a file) and starts with another
    config and plugin set."""
    s.drop("lamp_ctl", lamp_plugin())
    s.drop("stray", lamp_plugin())
    s.restart(buffer_file=str(s.root / "outbox.jsonl"))
    s.broker_restart(lambda: s.restart(actuators={"lamp": Device("pwm", 18)}, sensors={"door": Device("button", 23)},
                                       gone=("stray",)), forgets=True)


def read_only_and_back(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.restart(commands=False)
    s.restart(commands=True, actuators={"lamp": Device("pwm", 18)})


def read_only_restarts_without_a_device(s: Scene) -> None:
    """A restart into read-only mode, and one in it, each with a device or a plugin gone: what a run before
    published of them goes too (Home Assistant kept ghost entities)."""
    s.drop("lamp_ctl", lamp_plugin())
    s.drop("stray", lamp_plugin())
    s.restart(commands=False, actuators={"lamp": Device("pwm", 18)}, gone=("stray",))
    s.restart(sensors={"presence": Device("motion", 17)})


def discovery_off_and_on(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.restart(discovery=False)  # Home Assistant is told of nothing: what it was told before goes
    s.restart(discovery=True)


def shadows_come_and_go(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.shadow("lamp_ctl", lamp_plugin(duty=60))  # disagrees: its agreement has series and an entity
    s.remove("lamp_ctl")  # the shadow runs on alone
    s.drop("lamp_ctl", lamp_plugin())
    s.shadow("lamp_ctl", None)


def a_shadow_taken_out_after_its_plugin(s: Scene) -> None:
    """Found by the machine on a longer budget (60 examples): the live plugin removed, then its shadow taken
    out of the shadow folder: the shadow's agreement stayed in the metrics."""
    s.shadow("stray", lamp_plugin(duty=60))  # a shadow with no live plugin at all
    s.shadow("lamp_ctl", lamp_plugin(duty=60))
    s.drop("lamp_ctl", lamp_plugin())
    s.remove("lamp_ctl")
    s.shadow("lamp_ctl", None)


def a_thermostat_follows_its_config(s: Scene) -> None:
    s.drop("thermo", ThermostatManifest())
    s.configure("thermo", "sensor", "presence")  # its climate entity reads another thermometer
    s.configure("thermo", "target", 19)
    s.drop("thermo", ThermostatManifest(sensor="presence"))
    s.reload(sensors={"probe": Device("ds18b20")})  # the thermometer it names is gone


def a_shadow_compared_on_an_actuator_a_reload_removes(s: Scene) -> None:
    """Found by the machine once it had rollouts: a thermostat plugin driving the heater, a shadow beside it, the
    heater taken out of the config (the plugin still commands it, refused): the shadow's agreement on the heater
    stayed in the metrics."""
    s.drop("thermo", ThermostatManifest(sensor="presence"))
    s.shadow("thermo", lamp_plugin(duty=60))
    s.reload(actuators={"boiler": Device("pwm", 27), "lamp": Device("relay", 18)})


def rollouts_replace_a_plugin(s: Scene) -> None:
    s.drop("lamp_ctl", lamp_plugin())
    s.rollout("lamp_ctl")  # another module without config: its config entities go
    s.restart()
    s.drop("lamp_ctl", lamp_plugin())  # the owner's version by hand again
    s.shadow("lamp_ctl", lamp_plugin(duty=60))
    s.rollout("lamp_ctl")  # over a shadow put in by hand
    s.rollout("lamp_ctl")  # the version it runs already


def a_node_moved_while_its_plugins_change(s: Scene) -> None:
    """The place (node id, discovery prefix, base topic) changed by restarts, across an outage too, and by a reload
    that waits for the next restart; a quarantined plugin replaced by a good one while the broker is away."""
    s.drop("lamp_ctl", lamp_plugin())
    s.drop("stray", lamp_plugin())
    s.restart(state_dir=s.root / "state", buffer_file=str(s.root / "outbox.jsonl"))  # it remembers where it is
    s.quarantine("stray")
    s.broker_restart(lambda: s.drop("stray", lamp_plugin(mode="silent")))
    s.broker_restart(lambda: s.restart(gone=("stray",), node_id="renamed"))
    s.reload(actuators={"lamp": Device("pwm", 18)}, discovery_prefix="ha")  # the devices now, the prefix at a restart
    s.restart(base_topic="site")
    s.restart(state_dir=s.root / "another")  # in place: nothing to sweep, nothing left


SEQUENCES = [
    plugins_come_and_go,
    reloads_change_the_devices,
    quarantine_and_the_operator,
    changes_while_the_broker_is_away,
    a_restart_with_another_config,
    an_outage_across_a_restart,
    read_only_and_back,
    read_only_restarts_without_a_device,
    discovery_off_and_on,
    shadows_come_and_go,
    a_shadow_taken_out_after_its_plugin,
    a_thermostat_follows_its_config,
    rollouts_replace_a_plugin,
    a_shadow_compared_on_an_actuator_a_reload_removes,
    a_node_moved_while_its_plugins_change,
]


@pytest.mark.parametrize("sequence", SEQUENCES, ids=lambda s: s.__name__)
def test_the_broker_retains_what_the_daemon_runs_after_every_step(scene: Scene, sequence: Callable[[Scene], None]
                                                                  ) -> None:
    started = time.monotonic()
    scene.start()
    sequence(scene)
    assert time.monotonic() - started < 120


def test_a_state_paho_resends_at_reconnecting_goes_before_the_emptying_of_its_topic(scene: Scene) -> None:
    """The reconnect race, driven step by step. A plugin's state is handed to paho, and the link drops before
    the broker acknowledged it (the broker stopped, then killed); the plugin is removed meanwhile, which
    empties its state. paho resends what it held once its connection callback returns: the link must not say
    connected before that (it waits for the broker's acknowledgement of `online`), or the emptying goes out
    first and the resent state is what the broker keeps. paho's thread is held in that callback while the
    daemon ticks."""
    scene.start()
    scene.drop("stray", lamp_plugin())
    daemon, broker = scene._daemon(), scene.broker
    link, topic = daemon.telemetry.link, f"{BASE}/plugin/stray/state"
    handed: list[Any] = []  # paho's receipts of the plugin's states
    publish = link.publish

    def recorded(message: Any) -> Any:
        receipt = publish(message)
        if message.topic == topic:
            handed.append(receipt)
        return receipt

    link.publish = recorded
    assert broker.process is not None
    broker.process.send_signal(signal.SIGSTOP)  # the connection stays up; nothing is acknowledged
    try:
        daemon.operator.submit(EnablePlugin("stray", False, ""))
        scene._tick_until(lambda: bool(handed), "the switched-off plugin's state handed to paho")
    finally:
        broker.process.kill()  # unacknowledged: paho keeps it to resend
        broker.process.wait()
        broker.process = None
    assert not handed[-1].is_published()
    assert scene.rig is not None
    deadline = time.monotonic() + LINK_WAIT_S
    while link.connected():
        scene.rig.tick()
        assert time.monotonic() < deadline, "the daemon never saw the broker go"
    scene.remove("stray")  # its state emptied, waiting for the broker
    entered, release = threading.Event(), threading.Event()
    up = link._up

    def held(client: mqtt.Client) -> None:
        entered.set()
        release.wait(LINK_WAIT_S)
        up(client)

    link._up = held
    broker.start()
    try:
        assert entered.wait(LINK_WAIT_S), "the daemon never reconnected"
        scene.rig.ticks(5)  # the outbox pumps at each tick, if the link says connected
        assert not link.connected()
    finally:
        release.set()
    assert link._connected.wait(LINK_WAIT_S)
    scene.agree("the reconnection")  # nothing retained on the plugin's state


def left_by(node: str, broker: dict[str, bytes]) -> list[str]:
    """The retained topics of `node`: under its base topic, and its discovery configs."""
    return sorted(t for t in broker if t.startswith(f"pi-controller/{node}/") or t.split("/")[2:3] == [node])


@contextlib.contextmanager
def a_node_with_a_plugin(tmp_path: Path) -> Iterator[Scene]:
    """A daemon with a state directory and a plugin running, on a broker of its own; both stopped after."""
    broker = Broker(tmp_path)
    broker.start()
    with quiet_logs():
        scene = Scene(tmp_path, broker, state_dir=tmp_path / "state")
        try:
            scene.start()
            scene.drop("lamp_ctl", lamp_plugin())
            yield scene
        finally:
            scene.stop()
            broker.stop()


@pytest.mark.parametrize("elsewhere", [False, True], ids=["the old id unused", "another Pi under the old id"])
def test_a_pi_given_another_node_id_empties_what_it_left_under_the_old_one(tmp_path: Path, elsewhere: bool) -> None:
    """Restarted under another node id, the daemon empties what it published under the one before (remembered in
    its state directory), unless a client says `online` under the old id: that is another Pi's now."""
    with a_node_with_a_plugin(tmp_path) as scene:
        broker = scene.broker
        before = left_by(NODE, retained(broker.port))
        assert f"{BASE}/status" in before and f"{PREFIX}/sensor/{NODE}/plugin_lamp_ctl/config" in before
        assert scene.rig is not None
        scene.rig.stop()
        if elsewhere:
            other = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="the-other-pi")
            other.connect("127.0.0.1", broker.port)
            other.loop_start()
            other.publish(f"{BASE}/status", b"online", qos=1, retain=True).wait_for_publish(PROBE_WAIT_S)
            other.disconnect()
            other.loop_stop()
        scene.mqtt["node_id"] = "renamed"
        scene._write_config()
        daemon = scene.rig.start()
        for _ in range(CONVERGE_TICKS):
            scene.rig.tick()
            scene.rig.settle()
            now = retained(broker.port)
            if not daemon.telemetry.former.before and left_by("renamed", now) \
                    and (elsewhere or not left_by(NODE, now)):
                break
        scene.rig.ticks(3)  # an emptying queued at the sweep goes out within a tick
        now = retained(broker.port)
        assert left_by("renamed", now)  # it runs under its new id
        left = left_by(NODE, now)
        # (the node's `instance` emptied at its clean stop: the other one's `online` was not said by this install)
        assert left == ([t for t in before if t != f"{BASE}/instance"] if elsewhere else []), left


def test_a_pi_moved_while_its_broker_was_down_after_a_crash_empties_its_own_online_left_under_the_old_id(
        tmp_path: Path) -> None:
    """The broker killed while the daemon was connected (no last will: it comes back from its autosave with the
    node's `online`), the daemon restarted under another node id meanwhile. That `online` is this install's (its
    `instance` says so), not another Pi's: what the node left under the old id is emptied, not kept for good as a
    device Home Assistant shows available."""
    with a_node_with_a_plugin(tmp_path) as scene:
        broker = scene.broker
        before = retained(broker.port)
        assert before[f"{BASE}/status"] == b"online" and f"{BASE}/instance" in before
        scene.autosaved()  # the node's `online` with it
        scene.broker_restart(lambda: scene.restart(node_id="renamed"), crashes=True)  # agrees: nothing left
        now = retained(broker.port)
        assert left_by("renamed", now) and left_by(NODE, now) == []


# -- any sequence: the same events drawn by hypothesis ------------------------------------------------------

NAMES = ("lamp_ctl", "thermo", "stray")
MANIFESTS = (lamp_plugin(), None, ThermostatManifest(), ThermostatManifest(sensor="presence"))
DEVICE_SETS: tuple[tuple[Devices, Devices], ...] = (
    (FIRST_ACTUATORS, FIRST_SENSORS),
    ({"boiler": Device("pwm", 27), "lamp": Device("relay", 18)}, {"presence": Device("ds18b20")}),
    ({**FIRST_ACTUATORS, "vent": Device("servo", 13)}, {"probe": Device("motion", 23), "door": Device("button", 17)}),
)
# Where the node publishes: the first place, and each of its three parts changed.
PLACES: tuple[dict[str, Any], ...] = (
    {"node_id": NODE, "base_topic": "pi-controller", "discovery_prefix": PREFIX},
    {"node_id": "renamed"}, {"base_topic": "site"}, {"discovery_prefix": "ha"})
# What changes while the broker is away (`EntitiesMachine.broker_restart`).
MEANWHILE = st.one_of(st.none(), st.tuples(st.just("reload"), st.sampled_from(DEVICE_SETS)),
                      st.tuples(st.just("drop"), st.sampled_from(NAMES), st.sampled_from([*MANIFESTS, "removed"])),
                      st.tuples(st.just("move"), st.sampled_from(PLACES), st.sampled_from(NAMES)))
GONE_ACTUATORS = sorted({a for actuators, _ in DEVICE_SETS for a in actuators} | {"boiler_2"})
COMMANDS = ("actuator/{}/set", "actuator/{}/release", "plugin/{}/enable", "plugin/{}/config/mode/set")
# Deterministic, as tests/daemon_machine.py's in-suite budget: the same sequences on every run.
IN_SUITE = settings(max_examples=12, stateful_step_count=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


class EntitiesMachine(RuleBasedStateMachine):
    """The events of the sequences above in any order; each step waits for the invariant (`Scene.agree`)."""

    max_outages: ClassVar[int] = 1  # of the broker in a sequence: each costs seconds of real time (paho's back-off)
    examples: ClassVar[int] = 0  # machines built so far in this process: one per example (benchmarks/fuzz.py)
    steps: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.root = Path(tempfile.mkdtemp(prefix="pi-controller-entities-"))
        self.outages = 0
        self.broker = Broker(self.root)
        self.broker.start()
        self._logs = quiet_logs()
        self._logs.__enter__()
        self.scene = Scene(self.root, self.broker, owner=Ed25519PrivateKey.generate(), state_dir=self.root / "state",
                           mqtt={"buffer_file": str(self.root / "outbox.jsonl")})

    @initialize()
    def start(self) -> None:
        self.scene.start()

    def teardown(self) -> None:
        try:
            self.scene.stop()
            self.broker.stop()
        finally:
            self._logs.__exit__(None, None, None)
            shutil.rmtree(self.root, ignore_errors=True)

    @invariant()
    def counted(self) -> None:
        """Each step judged its own invariant as it ended (`Scene.agree`); here it is only counted."""
        type(self).steps += 1

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule(name=st.sampled_from(NAMES), manifest=st.sampled_from(MANIFESTS))
    def drop(self, name: str, manifest: Manifest | ThermostatManifest | None) -> None:
        self.scene.drop(name, manifest)

    @precondition(lambda self: self.scene.folder.is_dir() and self.scene.plugins)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        self.scene.remove(data.draw(st.sampled_from(sorted(self.scene.plugins))))

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule()
    def delete_folder(self) -> None:
        self.scene.delete_folder()

    @precondition(lambda self: not self.scene.folder.is_dir())
    @rule()
    def recreate_folder(self) -> None:
        self.scene.recreate_folder()

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule(devices=st.sampled_from(DEVICE_SETS), disabled=st.sampled_from([frozenset(), frozenset({"lamp_ctl"})]))
    def reload(self, devices: tuple[Devices, Devices], disabled: frozenset[str]) -> None:
        self.scene.reload(*devices, disabled=disabled)

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule(devices=st.sampled_from(DEVICE_SETS), commands=st.booleans())
    def restart(self, devices: tuple[Devices, Devices], commands: bool) -> None:
        """Into read-only mode too (`commands` false), or back."""
        self.scene.restart(*devices, commands=commands)

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule(devices=st.sampled_from(DEVICE_SETS), mqtt=st.sampled_from([*PLACES, {"commands": False},
                                                                        {"commands": True}]))
    def reload_mqtt(self, devices: tuple[Devices, Devices], mqtt: dict[str, Any]) -> None:
        """A reload with other devices and other MQTT settings: the devices follow, the MQTT settings wait for the
        next restart (any rule's), the daemon publishing where it did until then."""
        self.scene.reload(*devices, **mqtt)

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule(place=st.sampled_from(PLACES))
    def move(self, place: dict[str, Any]) -> None:
        """Restarted under another node id, base topic or discovery prefix (or back to the first): what it
        published where it was goes (its state directory remembers where)."""
        self.scene.restart(**place)

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule()
    def new_state_dir(self) -> None:
        """Restarted with a state directory of its own, empty (`--state-dir` elsewhere, a new SD card): the operator's
        values and the place it published under are forgotten; it publishes where it did (a reload's other place
        put back: with its record gone, what it left where it was is the owner's to empty, as the docs say)."""
        place = {key: self.scene.running.get(key, first) for key, first in PLACES[0].items()}
        self.scene.restart(state_dir=self.root / f"state-{uuid.uuid4().hex[:8]}", **place)

    @precondition(lambda self: self.scene.folder.is_dir() and self.scene.running.get("commands", True))
    @rule(name=st.sampled_from(NAMES))
    def rollout(self, name: str) -> None:
        """Another version of a plugin rolled out to the node (one it does not run: refused). Not of one the
        operator switched off: its live window waits until it is switched on (docs/fleet.md)."""
        if name not in self.scene._daemon().operator.disabled:
            self.scene.rollout(name)

    @precondition(lambda self: self.scene.folder.is_dir() and self.outages < self.max_outages)
    @rule(forgets=st.booleans(), crashes=st.booleans(), meanwhile=MEANWHILE)
    def broker_restart(self, forgets: bool, crashes: bool, meanwhile: tuple[Any, ...] | None) -> None:
        """The broker restarted (or crashed: killed), and meanwhile: the config reloaded with other devices; a plugin
        dropped in (or replaced: a quarantined plugin by a good one) or removed; the daemon restarted under another
        place, a plugin taken out (after a crash too: the old place's `online`, which no will retracted, is this
        install's by its `instance`, and swept; the crash after an autosave of what the daemon said last, as one
        older may hold the `online` of a state directory before this one's, another install, whose topics are left
        as docs/home-assistant.md says)."""
        scene = self.scene
        if crashes and meanwhile is not None and meanwhile[0] == "move":
            scene.autosaved()

        def change() -> None:
            match meanwhile:
                case ("reload", devices):
                    scene.reload(*devices)
                case ("drop", name, manifest) if manifest != "removed":
                    scene.drop(name, manifest)
                case ("drop", name, _) if name in scene.plugins:
                    scene.remove(name)
                case ("move", place, gone):
                    scene.restart(gone=(gone,) if gone in scene.plugins else (), **place)

        self.outages += 1
        scene.broker_restart(change, forgets, crashes)

    @precondition(lambda self: any(name in self.scene._daemon().plugins.status for name in NAMES))
    @rule(name=st.sampled_from(NAMES), release=st.booleans())
    def quarantine(self, name: str, release: bool) -> None:
        """A plugin that runs with a mode made to trap until it is quarantined (and given a mode whose calls are
        clean again, if `release`), as any failing plugin is. (Every draw is from a fixed list, whatever the daemon
        runs: hypothesis replays a sequence by its draws.)"""
        scene, daemon = self.scene, self.scene._daemon()
        config = next((p.config for p in daemon.plugins if p.name == name), {})
        status = daemon.plugins.status.get(name)
        if status is None or status.state != "loaded" or name in daemon.operator.disabled or "mode" not in config:
            return
        scene.quarantine(name)
        clean = "silent" if isinstance(scene.plugins.get(name), Manifest) else \
            "off" if "heater" in scene.actuators and scene.actuators["heater"].kind == "relay" else None
        if release and clean is not None:
            scene.release(name, clean)

    @precondition(lambda self: self.scene.running.get("commands", True))
    @rule(command=st.sampled_from(COMMANDS), actuator=st.sampled_from(GONE_ACTUATORS),
          plugin=st.sampled_from([*NAMES, "nothing_here"]))
    def command_a_gone_thing(self, command: str, actuator: str, plugin: str) -> None:
        """A command for an actuator or plugin the daemon does not run (a removed one's entity kept by a
        dashboard, an automation): refused, and nothing retained of it."""
        scene = self.scene
        on_actuator = command.startswith("actuator/")
        gone, expected = (actuator, "unknown_device") if on_actuator else (plugin, "unknown_plugin")
        if gone in (scene.actuators if on_actuator else scene._daemon().plugins.status):
            return
        answer = scene.ask(command.format(gone), b'{"state": "ON"}' if command.endswith("/set") else b"on")
        assert (answer.get("ok"), answer.get("rule")) == (False, expected), answer
        scene.agree(f"a command on {command.format(gone)}")

    @precondition(lambda self: any(name in self.scene._daemon().plugins.status for name in NAMES))
    @rule(name=st.sampled_from(NAMES), enabled=st.booleans())
    def switch(self, name: str, enabled: bool) -> None:
        if name in self.scene._daemon().plugins.status:
            self.scene.switch(name, enabled)

    @precondition(lambda self: self.scene.folder.is_dir())
    @rule(name=st.sampled_from(NAMES), on=st.booleans())
    def shadow(self, name: str, on: bool) -> None:
        self.scene.shadow(name, lamp_plugin(duty=60) if on else None)

    @rule()
    def home_assistant_restarts(self) -> None:
        """Home Assistant started again: the daemon sends it discovery and every state (not seen in read-only
        mode: what is retained does)."""
        self.scene.home_assistant_restarts()

    @precondition(lambda self: "thermo" in self.scene._daemon().plugins.status)
    @rule(sensor=st.sampled_from(["probe", "presence"]))
    def thermometer(self, sensor: str) -> None:
        self.scene.configure("thermo", "sensor", sensor)


def test_any_sequence_of_these_events_keeps_the_broker_to_what_the_daemon_runs() -> None:
    run_state_machine_as_test(EntitiesMachine, settings=IN_SUITE)
