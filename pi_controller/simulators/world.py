"""Wires models to mock pins: the environment a `--simulate` run advances before each read.

Each device kind says where a model writes its sensor (`SensorSettings.port`) and reads its actuator
(`ActuatorSettings.probe`)."""

from __future__ import annotations

from typing import Iterable

from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.devices.mock_pins import SimulatedFactory
from pi_controller.devices.sensors import SensorSettings
from pi_controller.devices.simulation import Port, Probe, SimulationError
from pi_controller.simulators.adc import SimulatedMCP3008
from pi_controller.simulators.models import MODELS, Model, ModelSettings


class World:
    """The config's `simulation:` models wired to its sensors and actuators on a simulated factory (a
    `devices.simulation.SimulatedBoard` to the sensor kinds that place their ports on it)."""

    def __init__(self, sensors: Iterable[SensorSettings], actuators: Iterable[ActuatorSettings],
                 models: Iterable[ModelSettings], factory: SimulatedFactory):
        self.factory = factory
        self._adcs: dict[int, SimulatedMCP3008] = {}
        sensors_by_id = {s.id: s for s in sensors}
        actuators_by_id = {a.id: a for a in actuators}
        self.models: list[Model] = []
        for model_settings in models:
            ports: dict[str, Port] = {}
            probes: dict[str, Probe] = {}
            for key, (role, ref) in model_settings.references().items():
                if role == "sensor":
                    ports[key] = self._port(sensors_by_id[ref])
                else:
                    probes[key] = actuators_by_id[ref].probe(self.factory)
            self.models.append(MODELS[type(model_settings)](model_settings, ports, probes))

    def advance(self, now: float) -> None:
        for model in self.models:
            model.advance(now)

    def close(self) -> None:
        for adc in self._adcs.values():
            adc.close()

    def adc(self, chip_select: int) -> SimulatedMCP3008:
        """The simulated ADC on this chip select, shared by the sensors on its channels."""
        if chip_select not in self._adcs:
            self._adcs[chip_select] = SimulatedMCP3008(self.factory, chip_select)
        return self._adcs[chip_select]

    def _port(self, sensor: SensorSettings) -> Port:
        try:
            port = sensor.port(self)
        except OSError as exc:  # a file of the owner's that a model would write (a DS18B20's base_dir)
            raise SimulationError(f"cannot simulate sensor '{sensor.id}': {exc.strerror or exc}: {exc.filename}; "
                                  f"give it a writable place for simulated runs, or leave it under /sys, which "
                                  f"simulated pins simulate") from exc
        if port is None:
            raise SimulationError(f"no simulated port for sensor '{sensor.id}' of kind {sensor.kind}")
        return port
