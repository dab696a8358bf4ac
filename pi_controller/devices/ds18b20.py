"""A 1-wire DS18B20 read from its sysfs file, on a thread of its own.

The kernel converts on every read of w1_slave, which blocks for about 750 ms, far longer than a tick:
the sensor is polled every `poll_interval_s` and the tick takes the last result. With
`poll_interval_s: 0` it is read inline (for simulated sysfs trees, which answer at once). On simulated
pins the kernel's own tree is simulated (`kernel_files`), read inline too: it reads `SIMULATED_C` unless a
model (a room) drives it.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pi_controller.clock import Clock
from pi_controller.contract import Reading
from pi_controller.devices.kernel_files import KernelFile, KernelFilePort, SimulatedFile, kernel_file
from pi_controller.devices.sensors import Sensor, SensorSettings

if TYPE_CHECKING:
    from gpiozero.pins import Factory

    from pi_controller.devices.simulation import SimulatedBoard

DEFAULT_W1_DIR = "/sys/bus/w1/devices"
SIMULATED_C = 20.0  # a probe in a room, on simulated pins where no model drives it


def w1_slave_text(celsius: float) -> str:
    """The two lines the kernel's w1_therm driver gives: a CRC verdict, then the temperature in millidegrees."""
    return f"00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t={round(celsius * 1000)}\n"


@dataclass(frozen=True, kw_only=True)
class DS18B20Settings(SensorSettings):
    kind: Literal["ds18b20"]
    device: str
    unit: str = "celsius"
    base_dir: str = DEFAULT_W1_DIR
    poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{2}-[0-9a-f]{12}", self.device):
            raise ValueError(f"device {self.device!r} is not a 1-wire id such as '28-0316a2790aff'")
        super().__post_init__()
        if self.poll_interval_s < 0:
            raise ValueError("poll_interval_s must be 0 (read inline) or more")
        if self.poll_interval_s == 0 and self.base_dir == DEFAULT_W1_DIR:
            raise ValueError("poll_interval_s: 0 reads in the tick, but the kernel's w1_slave takes ~750 ms; "
                             "poll it (the default) or point base_dir at a simulated tree")

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        return DS18B20(self, clock, kernel_file(self.w1_slave, factory, w1_slave_text(SIMULATED_C)))

    def simulated(self) -> SensorSettings:
        """A tree of the owner's is read in the tick: the poll thread sleeps in real time."""
        return self if self.base_dir == DEFAULT_W1_DIR else dataclasses.replace(self, poll_interval_s=0.0)

    def port(self, board: SimulatedBoard) -> KernelFilePort:
        return KernelFilePort(kernel_file(self.w1_slave, board.factory, w1_slave_text(SIMULATED_C)), w1_slave_text)

    @property
    def w1_slave(self) -> Path:
        return Path(self.base_dir) / self.device / "w1_slave"


class DS18B20(Sensor):
    """Parses the w1_slave file: a CRC verdict line, then the temperature in millidegrees."""

    POWER_ON_VALUE = 85.0  # what the chip reports before its first conversion, not a temperature
    CONVERSION_S = 0.75  # a 12-bit conversion

    settings: DS18B20Settings

    def __init__(self, settings: DS18B20Settings, clock: Clock, w1_slave: KernelFile):
        super().__init__(settings)
        self.clock = clock
        self.w1_slave = w1_slave
        self._last: Reading | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.poll_interval_s > 0 and not isinstance(w1_slave, SimulatedFile):  # that one answers at once
            self._last = super().read(self.clock.time())
            self._thread = threading.Thread(target=self._poll, name=f"w1-{settings.id}", daemon=True)
            self._thread.start()

    def read(self, now: float) -> Reading:
        if self._thread is None:
            return super().read(now)
        last = self._last
        assert last is not None
        # A poll stuck on the bus must not serve its last value as fresh for ever.
        silent = now - last.timestamp
        if silent > 3 * max(self.settings.poll_interval_s, self.CONVERSION_S):
            return self._invalid(now, f"no reading for {silent:.1f} s: the 1-wire bus does not answer")
        return last

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            self._last = super().read(self.clock.time())

    def _sample(self) -> float:
        lines = self.w1_slave.read_text().splitlines()
        if len(lines) < 2 or not lines[0].rstrip().endswith("YES"):
            raise ValueError("CRC check failed")
        _, _, raw = lines[1].rpartition("t=")
        value = int(raw) / 1000.0
        if value == self.POWER_ON_VALUE:
            raise ValueError("power-on value 85 C: the sensor has not converted yet")
        return value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
