"""Sensors and actuators on gpiozero's mock pins: values, failures as data, safe states."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPWMPin
from structlog.testing import capture_logs

from pi_controller import config, contract
from pi_controller.clock import VirtualClock
from pi_controller.devices import actuators, sensors
from pi_controller.devices.cpu_temperature import CPUTemperatureSettings
from pi_controller.devices.digital import DigitalSettings
from pi_controller.devices.ds18b20 import DS18B20Settings
from pi_controller.devices.hardware import Hardware, HardwareError, Write
from pi_controller.devices.mcp3008 import MCP3008Settings
from pi_controller.devices.mock_pins import SimulatedFactory
from pi_controller.devices.pins import make_factory
from pi_controller.devices.pwm import PwmSettings
from pi_controller.devices.relay import RelaySettings
from pi_controller.devices.servo import ServoSettings
from pi_controller.simulators.adc import SimulatedMCP3008
from tests.conftest import example_data

CLOCK = VirtualClock()


@pytest.fixture
def factory() -> SimulatedFactory:
    factory = SimulatedFactory()
    Device.pin_factory = factory
    return factory


def w1_file(base: Path, device: str, text: str) -> None:
    (base / device).mkdir(parents=True, exist_ok=True)
    (base / device / "w1_slave").write_text(text)


GOOD_W1 = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


@pytest.mark.parametrize("text,value,error", [
    (GOOD_W1, 23.125, None),
    ("72 01 4b 46 7f ff 0e 10 57 : crc=00 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n", None, "CRC check failed"),
    ("50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n", None, "power-on value"),
    ("", None, "CRC check failed"),
])
def test_ds18b20_parses_the_sysfs_file(tmp_path, text, value, error) -> None:
    w1_file(tmp_path, "28-0316a2790aff", text)
    settings = DS18B20Settings(id="t", kind="ds18b20", device="28-0316a2790aff", base_dir=str(tmp_path),
                               poll_interval_s=0)
    reading = settings.sensor(None, CLOCK).read(5.0)
    assert (reading.value, reading.valid) == (value, error is None)
    assert error is None or error in reading.error
    assert reading.timestamp == 5.0 and reading.unit == "celsius"


def test_ds18b20_missing_file_is_an_invalid_reading(tmp_path) -> None:
    settings = DS18B20Settings(id="t", kind="ds18b20", device="28-0316a2790aff", base_dir=str(tmp_path),
                               poll_interval_s=0)
    reading = settings.sensor(None, CLOCK).read(1.0)
    assert not reading.valid and reading.value is None
    assert "FileNotFoundError" in reading.error


def polled_ds18b20(tmp_path: Path, interval_s: float, clock: VirtualClock) -> sensors.Sensor:
    """A DS18B20 reading 23.125 C, polled on its own thread every `interval_s`."""
    w1_file(tmp_path, "28-0316a2790aff", GOOD_W1)
    settings = DS18B20Settings(id="t", kind="ds18b20", device="28-0316a2790aff", base_dir=str(tmp_path),
                               poll_interval_s=interval_s)
    return settings.sensor(None, clock)


def test_ds18b20_is_polled_on_its_own_thread(tmp_path) -> None:
    clock = VirtualClock()
    sensor = polled_ds18b20(tmp_path, 0.02, clock)
    try:
        assert sensor.read(clock.time()).value == 23.125  # read once at start
        w1_file(tmp_path, "28-0316a2790aff", GOOD_W1.replace("t=23125", "t=19500"))
        deadline = time.monotonic() + 5
        while sensor.read(clock.time()).value != 19.5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sensor.read(clock.time()).value == 19.5  # the thread picked the change up
    finally:
        sensor.close()


def test_ds18b20_whose_bus_stops_answering_goes_invalid(tmp_path) -> None:
    clock = VirtualClock()
    sensor = polled_ds18b20(tmp_path, 30, clock)
    try:
        first = sensor.read(clock.time())
        assert first.value == 23.125 and first.timestamp == clock.time()
        clock.advance(89.0)  # under three poll intervals: the last value stands
        assert sensor.read(clock.time()) == first
        clock.advance(2.0)
        stale = sensor.read(clock.time())
        assert stale.value is None and stale.error == "no reading for 91.0 s: the 1-wire bus does not answer"
    finally:
        sensor.close()


def test_mcp3008_reads_through_software_spi_with_scale_and_offset(factory) -> None:
    adc = SimulatedMCP3008(factory, 0)
    settings = MCP3008Settings(id="tmp36", kind="mcp3008", channel=3, unit="celsius", scale=330.0,
                               offset=-50.0)
    sensor = settings.sensor(factory, CLOCK)
    adc.fractions[3] = (21.0 + 50.0) / 330.0
    assert sensor.read(0).value == pytest.approx(21.0, abs=330 / 1023)
    adc.fractions[3] = 0.0
    assert sensor.read(0).value == pytest.approx(-50.0, abs=330 / 1023)
    sensor.close()


def test_simulated_mcp3008_answers_every_channel_single_ended_and_differential(factory) -> None:
    from gpiozero import MCP3008

    adc = SimulatedMCP3008(factory, 0)
    adc.fractions = [0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0]
    for channel in range(8):
        single = MCP3008(channel=channel, pin_factory=factory)
        pair = MCP3008(channel=channel, differential=True, pin_factory=factory)
        try:  # 10 bits: within one step of full scale
            assert single.value == pytest.approx(adc.fractions[channel], abs=1 / 1023)
            difference = max(0.0, adc.fractions[channel] - adc.fractions[channel ^ 1])
            assert pair.value == pytest.approx(difference, abs=1 / 1023)
        finally:
            single.close()
            pair.close()
    adc.close()


GARBAGE_INSIDE_RESERVATIONS = """
import gc
gc.set_threshold(50, 1, 1)  # collections start inside gpiozero's reserve_pins, with its lock held
from gpiozero import MCP3008
from pi_controller.devices.mock_pins import SimulatedFactory
from pi_controller.simulators.adc import SimulatedMCP3008
for _ in range(3):
    factory = SimulatedFactory()
    adc = SimulatedMCP3008(factory, 0)
    for channel in range(8):
        for differential in (False, True):
            device = MCP3008(channel=channel, differential=differential, pin_factory=factory)
            device.value
            device.close()
    adc.close()
print("done")
"""


def test_a_shared_spi_bus_collected_while_pins_are_reserved_does_not_hang_the_process() -> None:
    # Without the re-entrant lock this hung in the first round, every time.
    result = subprocess.run([sys.executable, "-c", GARBAGE_INSIDE_RESERVATIONS], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr


LED_AND_FAN = {"actuators": [{"id": "led", "kind": "pwm", "pin": 18}, {"id": "fan", "kind": "relay", "pin": 27}],
               "pins": {"factory": "mock"}}


@pytest.fixture
def led_and_fan(write_config) -> Iterator[Hardware]:
    """A PWM output and a relay on simulated pins."""
    settings = config.load(write_config(LED_AND_FAN))
    factory = make_factory(settings.pins, settings.sensors, simulate=True)
    hardware = Hardware.build(settings.actuators, settings.sensors, factory, CLOCK)
    try:
        yield hardware
    finally:
        hardware.close()


def test_the_tick_reads_the_sensors_the_last_reconfigure_set(led_and_fan, write_config) -> None:
    """What the tick samples is taken when the sensors are set (`sensors.sampling`): a reload's are read."""
    hardware = led_and_fan
    assert hardware.read(1.0) == []
    door = config.load(write_config({**LED_AND_FAN, "sensors": [{"id": "door", "kind": "line", "pin": 5,
                                                                 "valid_max": 0.5}]}))
    hardware.reconfigure(door.actuators, door.sensors, CLOCK)
    assert [(r.sensor_id, r.value, r.unit) for r in hardware.read(2.0)] == [("door", 0.0, door.sensors[0].unit)]
    hardware.factory.pin(5).drive_high()
    assert hardware.read(2.5)[0].error == "1 is above valid_max 0.5"
    hardware.reconfigure(door.actuators, (), CLOCK)
    assert hardware.read(3.0) == []


def test_states_json_follows_every_actuator_change(led_and_fan) -> None:
    hardware = led_and_fan
    first = hardware.states_json()
    assert json.loads(first) == hardware.states()
    assert hardware.states_json() is first  # nothing moved: not encoded again
    hardware.apply([Write("led", 0.4, "p")], 1)
    assert json.loads(hardware.states_json())["led"]["value"] == pytest.approx(0.4)
    hardware.apply([Write("fan", 1.0, "p")], 2)
    assert json.loads(hardware.states_json()) == hardware.states()


def test_states_json_of_the_states_the_caller_has_is_theirs(led_and_fan) -> None:
    """The tick passes what `states()` gave it; states taken before a write since (the watchdog's thread) are
    encoded as they are, and the JSON kept for the states now is not taken for them."""
    hardware = led_and_fan
    before = hardware.states()
    assert hardware.states_json(before) is hardware.states_json()
    hardware.apply([Write("led", 0.4, "p")], 1)
    assert json.loads(hardware.states_json(before)) == before
    assert json.loads(hardware.states_json(hardware.states()))["led"]["value"] == pytest.approx(0.4)


def test_states_are_built_again_after_every_write_that_changed_an_actuator(led_and_fan, write_config) -> None:
    """`states()` is kept from one look to the next (the tick looks three times) until an actuator is
    written: by the tick, by the watchdog's settle or by a reload; a write that changes nothing keeps it."""
    hardware = led_and_fan
    kept = hardware.states()
    assert hardware.states() is kept
    hardware.apply([Write("led", kept["led"]["value"], "p")], 1)  # the target it has: nothing changes
    assert hardware.states() is kept
    hardware.apply([Write("led", 0.4, "p")], 2)
    moved = hardware.states()
    assert moved is not kept and moved["led"]["value"] == pytest.approx(0.4) and kept["led"]["value"] == 0
    assert json.loads(hardware.states_json()) == moved
    hardware.settle("safe", "test")
    assert hardware.states()["led"]["value"] == 0 and json.loads(hardware.states_json())["led"]["value"] == 0
    hardware.apply([Write("fan", 1.0, "p")], 3)
    assert hardware.states()["fan"]["on"] is True and json.loads(hardware.states_json())["fan"]["on"] is True
    fewer = config.load(write_config({**LED_AND_FAN, "actuators": LED_AND_FAN["actuators"][:1]}))
    hardware.reconfigure(fewer.actuators, fewer.sensors, CLOCK)
    assert list(hardware.states()) == ["led"] and list(json.loads(hardware.states_json())) == ["led"]


def test_an_actuator_s_state_json_is_its_state_encoded_whatever_it_was_before() -> None:
    """`state_json` is kept per target the actuator has been in: 1, 1.0 and True are one key to a dict but
    three JSON texts, and a fade's many steps are kept to KNOWN_STATES, never all."""
    factory = MockFactory(pin_class=MockPWMPin)
    built = [actuators.build(PwmSettings(id="led", kind="pwm", pin=18), factory),
             actuators.build(RelaySettings(id="fan", kind="relay", pin=27), factory),
             actuators.build(ServoSettings(id="vent", kind="servo", pin=13, min_angle=0, max_angle=90), factory)]
    targets = {"led": [0.5, 1, 1.0, True, 0, 0.0, 0.5, *(i / 100 for i in range(40)), 1],
               "fan": [1.0, 0.0, True, False, 1, 0, 1.0], "vent": [None, 30, 30.0, 45.5, None, 0, 0.0, 90]}
    try:
        for actuator in built:
            assert actuator.state_json == contract.COMPACT.encode(actuator.state)
            for target in targets[actuator.id]:
                actuator.apply(target, force=True)
                assert actuator.state_json == contract.COMPACT.encode(actuator.state), (actuator.id, target)
                assert actuator.state == actuator._describe(target)
            assert len(actuator._known) <= actuators.KNOWN_STATES
    finally:
        for actuator in built:
            actuator.close()


def test_digital_input_follows_its_pin_and_wiring(factory) -> None:
    motion = DigitalSettings(id="m", kind="motion", pin=17).sensor(factory, CLOCK)
    button = DigitalSettings(id="b", kind="button", pin=5).sensor(factory, CLOCK)
    factory.pin(17).drive_high()
    factory.pin(5).drive_low()  # a button pulls up, so pressed is low
    assert (motion.read(0).value, button.read(0).value) == (1.0, 1.0)
    factory.pin(17).drive_low()
    factory.pin(5).drive_high()
    assert (motion.read(0).value, button.read(0).value) == (0.0, 0.0)


def test_cpu_temperature_from_its_file(tmp_path, factory) -> None:
    (tmp_path / "temp").write_text("48312\n")
    sensor = CPUTemperatureSettings(id="cpu", kind="cpu_temperature",
                                                  sensor_file=str(tmp_path / "temp")).sensor(factory, CLOCK)
    assert sensor.read(0).value == pytest.approx(48.312)
    (tmp_path / "temp").unlink()
    assert not sensor.read(0).valid


def wait_valid(sensor: sensors.Sensor, seconds: float = 60.0) -> sensors.Reading:
    deadline = time.monotonic() + seconds
    reading = sensor.read(0)
    while not reading.valid and time.monotonic() < deadline:
        time.sleep(0.01)
        reading = sensor.read(0)
    return reading


def returned(call: Callable[[], Any]) -> list[Any]:
    """[what `call` returned], run on a thread; fails if it is still waiting a minute later (it blocks)."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the read blocked"
    return result


def test_light_sensor_reads_the_charge_time_without_blocking(write_config) -> None:
    data = {"sensors": [{"id": "ldr", "kind": "light", "pin": 4, "scale": 1000.0}], "pins": {"factory": "mock"}}
    settings = config.load(write_config(data))
    factory = make_factory(settings.pins, settings.sensors, simulate=True)
    factory.pin(4).charge_time = 3600.0  # no sample for an hour: a read that waited for one would hang
    hardware = Hardware.build(settings.actuators, settings.sensors, factory, CLOCK)
    try:
        (first,) = returned(lambda: hardware.sensors[0].read(0))  # never waits for the smoothing queue
        assert first.error == "ValueError: no sample yet: check the wiring"
        factory.pin(4).charge_time = 0.001  # bright: the capacitor charges in a tenth of the limit
        # Its value rests on real time: a busy machine reads it darker, down to 0 lux, but never invalid.
        assert wait_valid(hardware.sensors[0]).valid
    finally:
        hardware.close()


def test_distance_sensor_without_echo_is_invalid_not_zero_and_never_blocks(factory) -> None:
    from pi_controller.devices.distance import DistanceSettings

    # A plain mock trigger pin never echoes: an unplugged HC-SR04.
    sensor = DistanceSettings(id="d", kind="distance", echo=20, trigger=21).sensor(factory, CLOCK)
    try:
        readings = returned(lambda: [sensor.read(0) for _ in range(3)])[0]
        assert all(r.error == "ValueError: no sample yet: check the wiring" for r in readings)
    finally:
        sensor.close()


def test_a_distance_sensor_stops_sampling_before_it_lets_go_of_its_trigger(factory) -> None:
    """gpiozero's DistanceSensor drops its trigger, then stops its sampling thread: a read in between raised
    AttributeError in that thread (a raw traceback on stderr, seen under emulation at shut-down)."""
    from pi_controller.devices.distance import DistanceSettings

    sensor = DistanceSettings(id="d", kind="distance", echo=20, trigger=21).sensor(factory, CLOCK)
    queue, had_trigger = sensor.device._queue, []
    stop = queue.stop

    def noting_stop() -> None:
        had_trigger.append(sensor.device._trigger is not None)
        stop()

    queue.stop = noting_stop
    sensor.close()
    assert had_trigger[0] is True and not queue.is_alive()


def test_a_thread_that_fails_is_one_event_not_a_raw_traceback(cli_logs) -> None:
    """What every stderr line being an event (JSON when asked) needs of a library's thread too."""
    from pi_controller import logs

    logs.configure("json", "info")

    def fail() -> None:
        raise AttributeError("'NoneType' object has no attribute 'pin'")

    with capture_logs() as events:
        thread = threading.Thread(target=fail, name="fill")
        thread.start()
        thread.join()
    (event,) = [e for e in events if e["event"] == "thread_failed"]
    assert event["thread"] == "fill" and event["log_level"] == "error"
    assert event["exc_info"][0] is AttributeError


def test_a_non_finite_sample_is_an_invalid_reading() -> None:
    class Broken(sensors.Sensor):
        def _sample(self) -> float:
            return math.nan

    reading = Broken(DigitalSettings(id="x", kind="line", pin=6)).read(0)
    assert reading.error == "non-finite value nan"


def test_actuators_are_claimed_in_their_safe_state(factory) -> None:
    relay = actuators.build(RelaySettings(id="r", kind="relay", pin=27, active_high=False), factory)
    pwm = actuators.build(PwmSettings(id="p", kind="pwm", pin=18, safe_state=20.0, min_duty=10), factory)
    servo = actuators.build(ServoSettings(id="s", kind="servo", pin=13, safe_state=0.0), factory)
    # Active-low relay, off: the pin is high from the moment it is claimed; it never went low.
    assert [s.state for s in factory.pin(27).states] == [False, True]
    assert factory.pin(18).state == pytest.approx(0.2)
    assert servo.device.angle == pytest.approx(0.0)
    assert (relay.state, pwm.state["duty_cycle"], servo.state["angle"]) == (
        {"type": "relay", "on": False, "value": 0}, 20.0, 0.0)


def test_apply_writes_only_changes(factory) -> None:
    relay = actuators.build(RelaySettings(id="r", kind="relay", pin=27), factory)
    factory.pin(27).clear_states()
    assert relay.apply(1.0) and not relay.apply(1.0)
    assert relay.apply(0.0)
    factory.pin(27).assert_states([False, True, False])


def test_settle_drives_every_actuator_to_the_named_state(write_config) -> None:
    data = example_data()
    data["actuators"][0].update(safe_state=0, startup_state=10, shutdown_state=20)
    data["actuators"][2].update(startup_state="on")
    settings = config.load(write_config(data))
    factory = make_factory(settings.pins, settings.sensors, simulate=True)
    hardware = Hardware.build(settings.actuators, settings.sensors, factory, CLOCK)
    try:
        # Claimed in the start-up state: the relay was never off, the strip never at 0.
        assert [s.state for s in factory.pin(27).states] == [False, True]
        assert [s.state for s in factory.pin(18).states] == [0, 0.1]
        hardware.settle("shutdown", "test")
        assert (factory.pin(18).state, factory.pin(27).state) == (0.2, 0.0)
        hardware.settle("safe", "test")
        assert (factory.pin(18).state, factory.pin(27).state) == (0.0, 0.0)
    finally:
        hardware.close()


def test_servo_detaches_on_set_low(factory) -> None:
    servo = actuators.build(ServoSettings(id="s", kind="servo", pin=13), factory)
    servo.apply(servo.command("set_angle", {"angle": 30}))
    assert servo.device.angle == pytest.approx(30, abs=0.5)
    servo.apply(servo.command("set_low", {}))
    assert servo.device.value is None and servo.state["on"] is False


def test_hardware_build_failure_names_the_device_and_releases_the_rest(write_config, factory) -> None:
    data = example_data()
    settings = config.load(write_config(data))
    factory.pin(27, pin_class=MockPWMPin).function = "output"
    blocker = actuators.build(RelaySettings(id="other", kind="relay", pin=27), factory)
    with pytest.raises(HardwareError, match="device 'relay_switch'"):
        Hardware.build(settings.actuators, settings.sensors, factory, CLOCK)
    blocker.close()
    # The devices claimed before the failure were released: building again works.
    Hardware.build(settings.actuators, settings.sensors, factory, CLOCK).close()
