"""Sensors and actuators built from settings on one pin factory.

Nothing above this layer imports gpiozero. An optional environment (a simulator) is advanced to the
present before each read, so simulated physics happen on the same path a Pi's sensors take.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Protocol, Sequence, TypeVar

import msgspec
import structlog

from pi_controller import contract, logs
from pi_controller.clock import Clock
from pi_controller.contract import Reading
from pi_controller.devices import actuators
from pi_controller.devices.actuators import Actuator, ActuatorSettings, Target
from pi_controller.devices.sensors import Sensor, SensorSettings, sample, sampling

if TYPE_CHECKING:  # gpiozero is loaded by the kinds that build devices, not by what only names them
    from gpiozero.pins import Factory

log = structlog.get_logger("pi_controller.hardware")


class Environment(Protocol):
    def advance(self, now: float) -> None:
        """Bring the simulated world to time `now` and set the mock pins it drives."""

    def close(self) -> None: ...


State = Literal["safe", "startup", "shutdown"]
T = TypeVar("T")


class Write(msgspec.Struct, frozen=True, gc=False):  # made in C (see contract.Reading)
    """A target for an actuator, as the safety rules let it through, and on whose behalf."""

    device_id: str
    target: Target
    plugin: str


class HardwareError(Exception):
    """A device could not be set up; names the device."""


#: The exit code when the hardware could not be set up (no GPIO, lgpio missing, a device that does not
#: answer): not 2, as systemd is right to retry it (a 1-wire or SPI bus may come up late at boot).
EXIT_HARDWARE = 3


class Hardware:
    def __init__(self, sensor_list: list[Sensor], actuator_list: list[Actuator], factory: Factory):
        self.set_sensors(sensor_list)
        self._set_actuators({a.id: a for a in actuator_list})
        self.factory = factory
        self.environment: Environment | None = None
        self._lock = threading.Lock()  # the tick's writes against the watchdog's
        # Every write that changed an actuator (apply, settle, reconfigure) takes a new version, after the
        # write; `states` and `states_json` are built once per version, however often they are asked for.
        # From a counter: the watchdog's thread may settle without the lock, and next() loses no update.
        self._versions = itertools.count(1)
        self._version = 0
        self._states: tuple[int, dict[str, dict[str, Any]], str | None] = (-1, {}, None)

    @classmethod
    def build(cls, actuator_settings: Iterable[ActuatorSettings], sensor_settings: Iterable[SensorSettings],
              factory: Factory, clock: Clock) -> Hardware:
        """Claim every device; on failure release what was claimed and say which device failed."""
        built: list[Any] = []
        try:
            for a in actuator_settings:
                built.append(_claim(a.id, functools.partial(actuators.build, a, factory)))
            for s in sensor_settings:
                built.append(_claim(s.id, functools.partial(s.sensor, factory, clock)))
        except HardwareError:
            for device in built:
                device.close()
            raise
        return cls([d for d in built if isinstance(d, Sensor)], [d for d in built if isinstance(d, Actuator)],
                   factory)

    def reconfigure(self, actuator_settings: Sequence[ActuatorSettings], sensor_settings: Sequence[SensorSettings],
                    clock: Clock) -> dict[str, str]:
        """Make the devices match new settings between two ticks: unchanged devices are kept as they are
        (their pins never glitch); removed and changed ones are released, actuators after going to their
        shut-down state; new and changed ones are claimed. Returns the devices that failed, with why."""
        kept_actuators = {a.id: self.actuators[a.id] for a in actuator_settings
                          if a.id in self.actuators and self.actuators[a.id].settings == a}
        kept_sensors = {s.settings.id: s for s in self.sensors if s.settings in sensor_settings}
        with self._lock:
            for actuator in self.actuators.values():
                if actuator.id not in kept_actuators:
                    actuator.apply(actuator.shutdown_target, force=True)
                    actuator.close()
            for sensor in self.sensors:
                if sensor.settings.id not in kept_sensors:
                    sensor.close()
            failed: dict[str, str] = {}
            claimed = {a.id: kept_actuators.get(a.id) or _claim_or_note(
                a.id, functools.partial(actuators.build, a, self.factory), failed) for a in actuator_settings}
            reading = [kept_sensors.get(s.id) or _claim_or_note(
                s.id, functools.partial(s.sensor, self.factory, clock), failed) for s in sensor_settings]
            # Inside the lock: the watchdog must never see a device that failed to be claimed.
            self._set_actuators({key: a for key, a in claimed.items() if a is not None})
            self.set_sensors([sensor for sensor in reading if sensor is not None])
            self._version = next(self._versions)
        return failed

    def read(self, now: float) -> list[Reading]:
        if self.environment is not None:
            self.environment.advance(now)
        if self._sampled_when_read:  # as nearly every config: one frame for all (`sensors.sample`)
            return sample(self._sampling, now)
        return [sensor.read(now) for sensor in self.sensors]

    def apply(self, writes: Iterable[Write], tick: int) -> dict[str, str]:
        """Drive the actuators; returns those whose write failed, with why (the loop reports them)."""
        failed = {}
        with self._lock:
            for write in writes:
                actuator = self.actuators[write.device_id]
                was_on = actuator.state["on"]
                try:
                    changed = actuator.apply(write.target)
                except Exception as exc:  # a pin that fails to switch must not stop the others (its state
                    failed[actuator.id] = f"{type(exc).__name__}: {exc}"  # is set only after a write)
                    continue
                if not changed:
                    continue
                self._version = next(self._versions)
                if actuator.state["on"] != was_on and logs.enabled("info"):  # a fade's steps are not news
                    log.info("actuator_set", device=actuator.id, target=write.target, plugin=write.plugin,
                             tick=tick)
        return failed

    def settle(self, state: State, reason: str) -> None:
        """Every actuator to its safe, start-up or shut-down state, from any thread.

        One failure never keeps the others from it, and a tick stuck while holding the lock does not
        either: after a short wait the pins are driven regardless.
        """
        locked = self._lock.acquire(timeout=0.25)
        try:
            for actuator in self.actuators.values():
                try:
                    actuator.apply(getattr(actuator, f"{state}_target"), force=True)
                except Exception as exc:
                    log.error("actuator_write_failed", device=actuator.id, state=state, error=str(exc))
        finally:
            self._version = next(self._versions)
            if locked:
                self._lock.release()
        log.info(f"actuators_{state}", reason=reason,
                 states={key: a.target for key, a in self.actuators.items()})

    def states(self) -> dict[str, dict[str, Any]]:
        """Each actuator's state as the plugin context shows it: the same dict until an actuator is written
        (the tick looks three times; nobody may change it). The version is read before the states: a write
        from the watchdog's thread meanwhile leaves a snapshot of an older version, built again next time."""
        version, states, _ = self._states
        if version != self._version:
            version = self._version
            states = {key: actuator.state for key, actuator in self.actuators.items()}
            self._states = (version, states, None)
        return states

    def states_json(self, states: dict[str, dict[str, Any]] | None = None) -> str:
        """`states()` as the context's JSON, encoded once per version of them: most ticks change nothing.
        `states`: what `states()` has just returned, where the caller has it (the tick: a call less)."""
        if states is None:
            states = self.states()
        version, snapshot, encoded = self._states
        if snapshot is not states:  # another thread's write came in between: what was asked for, uncached
            return contract.encode_states(states)
        if encoded is None:  # as contract.encode_states(states) writes it, from each key's and actuator's own JSON
            encoded = "{" + ",".join([key + a.state_json for key, a in self._json_keys]) + "}"
            self._states = (version, states, encoded)
        return encoded

    def set_sensors(self, sensors: list[Sensor]) -> None:
        """The sensors the tick reads, in this order (set between two ticks)."""
        self.sensors = sensors
        # Whether every one reads as `Sensor.read` does, a sample when asked; not a kind that serves what a
        # thread of its own sampled (a polled DS18B20), nor a recording.
        self._sampled_when_read = all(type(s).read is Sensor.read for s in sensors)
        self._sampling = sampling(sensors) if self._sampled_when_read else []

    def _set_actuators(self, actuators: dict[str, Actuator]) -> None:
        self.actuators = actuators
        # Each with its key as the context's JSON writes it, and the colon: encoded once, not at every change.
        self._json_keys = [(contract.string(key) + ":", a) for key, a in actuators.items()]

    def close(self) -> None:
        """Shut-down state if anything is not in it yet, then release the sensors.

        Actuator pins stay claimed, driven in their shut-down state until the process exits: gpiozero
        would release them as floating inputs, and a relay board then does what its pull resistors say.
        """
        if any(a.target != a.shutdown_target for a in self.actuators.values()):
            self.settle("shutdown", "closing")
        if self.environment is not None:
            self.environment.close()
        for sensor in self.sensors:
            try:
                sensor.close()
            except Exception as exc:
                log.warning("device_close_failed", device=sensor.settings.id, error=str(exc))


def reentrant_reservations(factory: Factory) -> None:
    """gpiozero 2.0.1 reserves pins under a plain Lock, and a shared SPI bus left in a reference cycle
    releases its pins from `__del__`: a garbage collection that starts inside `reserve_pins` (a new
    MCP3008 allocating) then waits for the lock its own thread holds, and the process hangs. A
    re-entrant lock lets that release go through; the reservations it edits are plain lists."""
    factory._res_lock = threading.RLock()


def _claim(device_id: str, make: Callable[[], T]) -> T:
    try:
        return make()
    except Exception as exc:
        raise HardwareError(f"device '{device_id}': {type(exc).__name__}: {exc}") from exc


def _claim_or_note(device_id: str, make: Callable[[], T], failed: dict[str, str]) -> T | None:
    try:
        return _claim(device_id, make)
    except HardwareError as exc:
        failed[device_id] = str(exc)
        return None
