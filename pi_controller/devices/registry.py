"""Device kinds by the name a config gives them: adding a kind is its module and one line here."""

from __future__ import annotations

from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.devices.cpu_temperature import CPUTemperatureSettings
from pi_controller.devices.digital import DigitalSettings
from pi_controller.devices.distance import DistanceSettings
from pi_controller.devices.ds18b20 import DS18B20Settings
from pi_controller.devices.light import LightSettings
from pi_controller.devices.mcp3008 import MCP3008Settings
from pi_controller.devices.motor import MotorSettings
from pi_controller.devices.pwm import PwmSettings
from pi_controller.devices.relay import RelaySettings
from pi_controller.devices.sensors import SensorSettings
from pi_controller.devices.servo import ServoSettings

SENSORS: dict[str, type[SensorSettings]] = {
    "motion": DigitalSettings, "button": DigitalSettings, "line": DigitalSettings,
    "mcp3008": MCP3008Settings,
    "light": LightSettings,
    "distance": DistanceSettings,
    "cpu_temperature": CPUTemperatureSettings,
    "ds18b20": DS18B20Settings,
}

ACTUATORS: dict[str, type[ActuatorSettings]] = {
    "relay": RelaySettings,
    "pwm": PwmSettings,
    "servo": ServoSettings,
    "motor": MotorSettings,
}
