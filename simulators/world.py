"""Wires models to mock pins: the environment a `--simulate` run advances before each read."""

from __future__ import annotations

from gpiozero.pins.mock import MockPin
from pi_controller.config import Settings
from pi_controller.devices.actuators import ActuatorSettings, PwmSettings, RelaySettings, ServoSettings
from pi_controller.devices.pins import SimulatedFactory
from pi_controller.devices.sensors import DigitalSettings, DS18B20Settings, MCP3008Settings, SensorSettings
from pi_controller.simulators.adc import SimulatedMCP3008
from pi_controller.simulators.models import MODELS, Model, Port, Probe


class SimulationError(Exception):
    """A model wired to a device it cannot drive or read."""


class AdcPort:
    def __init__(self, adc: SimulatedMCP3008, settings: MCP3008Settings):
        self.adc = adc
        self.settings = settings

    def set(self, value: float) -> None:
        self.adc.fractions[self.settings.channel] = (value - self.settings.offset) / self.settings.scale


class DigitalPort:
    def __init__(self, pin: MockPin, settings: DigitalSettings):
        self.pin = pin
        self.active_low = settings.active_low

    def set(self, value: float) -> None:
        if (value >= 0.5) != self.active_low:
            self.pin.drive_high()
        else:
            self.pin.drive_low()


class W1FilePort:
    """Writes a DS18B20's w1_slave file as the kernel would (the sensor's base_dir must be writable)."""

    def __init__(self, settings: DS18B20Settings):
        self.path = settings.w1_slave
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SimulationError(f"cannot simulate sensor '{settings.id}' at {self.path}: {exc}; give it a "
                                  f"writable base_dir for simulated runs") from exc

    def set(self, value: float) -> None:
        milli = round(value * 1000)
        # Written aside and renamed: the sensor's poll thread must never see half a file.
        partial = self.path.with_suffix(".new")
        partial.write_text(f"00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t={milli}\n")
        partial.replace(self.path)


class PinProbe:
    """An output's level from its mock pin, whatever the wiring's polarity."""

    def __init__(self, pin: MockPin, active_high: bool):
        self.pin = pin
        self.active_high = active_high

    def level(self) -> float:
        state = float(self.pin.state)
        return state if self.active_high else 1.0 - state


class AngleProbe:
    """A servo's commanded angle, from the pulse width on its mock pin; while detached (no pulses)
    the last one, and before any, the middle of its range."""

    def __init__(self, pin: MockPin, settings: ServoSettings):
        self.pin = pin
        self.settings = settings
        self._last = (settings.min_angle + settings.max_angle) / 2

    def level(self) -> float:
        s = self.settings
        if self.pin.state:
            pulse_ms = self.pin.state * s.frame_ms
            share = (pulse_ms - s.min_pulse_ms) / (s.max_pulse_ms - s.min_pulse_ms)
            self._last = s.min_angle + share * (s.max_angle - s.min_angle)
        return self._last


class World:
    def __init__(self, settings: Settings, factory: SimulatedFactory):
        self.factory = factory
        self._adcs: dict[int, SimulatedMCP3008] = {}
        sensors = {s.id: s for s in settings.sensors}
        actuators = {a.id: a for a in settings.actuators}
        self.models: list[Model] = []
        for model_settings in settings.simulation:
            ports: dict[str, Port] = {}
            probes: dict[str, Probe] = {}
            for key, (role, ref) in model_settings.references().items():
                if role == "sensor":
                    ports[key] = self._port(sensors[ref])
                else:
                    probes[key] = self._probe(actuators[ref])
            self.models.append(MODELS[type(model_settings)](model_settings, ports, probes))

    def advance(self, now: float) -> None:
        for model in self.models:
            model.advance(now)

    def close(self) -> None:
        for adc in self._adcs.values():
            adc.close()

    def _port(self, sensor: SensorSettings) -> Port:
        if isinstance(sensor, MCP3008Settings):
            if sensor.chip_select not in self._adcs:
                self._adcs[sensor.chip_select] = SimulatedMCP3008(self.factory, sensor.chip_select)
            return AdcPort(self._adcs[sensor.chip_select], sensor)
        if isinstance(sensor, DigitalSettings):
            return DigitalPort(self.factory.pin(sensor.pin), sensor)
        if isinstance(sensor, DS18B20Settings):
            return W1FilePort(sensor)
        raise SimulationError(f"no simulated port for sensor '{sensor.id}' of kind {sensor.kind}")

    def _probe(self, actuator: ActuatorSettings) -> Probe:
        if isinstance(actuator, (RelaySettings, PwmSettings)):
            return PinProbe(self.factory.pin(actuator.pin), actuator.active_high)
        if isinstance(actuator, ServoSettings):
            return AngleProbe(self.factory.pin(actuator.pin), actuator)
        raise SimulationError(f"no simulated probe for actuator '{actuator.id}' of kind {actuator.kind}")
