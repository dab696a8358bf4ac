#!/usr/bin/env python3
"""The wiring pictures of docs/wiring.md, drawn from a config: one per device kind, the Pi's pins on the left,
the part on the right, what goes between them (dividers, pull resistors, the capacitor) on the wires.

A picture's GPIO numbers are the config's, read through the kind's own settings (`pins()`, `bus_pins()`: what
check-config and the daemon claim), so a picture cannot show a pin the code would not use; and every kind in
the registry must have a picture here (or be said to need no wiring), which tests/test_wiring_pictures.py
checks along with the files being what this script draws now.

    pip install -e '.[wiring]'                        # schemdraw, pinned: the pictures are byte for byte
    python scripts/draw-wiring.py                     # config/every-kind.yaml -> docs/images/wiring-KIND.svg
    python scripts/draw-wiring.py --check             # exit 1 if a committed picture differs

schemdraw draws schematics from Python (a well-kept library, its own SVG writer: no matplotlib, no fonts
embedded, the same bytes on any machine): the pictures are code, reviewed and regenerated like code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import schemdraw
import schemdraw.elements as elm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's pi_controller, installed or not

from pi_controller import config
from pi_controller.devices import registry
from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.devices.sensors import SensorSettings

CONFIG = REPO / "config" / "every-kind.yaml"
IMAGES = REPO / "docs" / "images"
W1_GPIO = 4  # the kernel's w1-gpio bus (dtoverlay=w1-gpio's default): not the config's, the kernel's
NO_WIRING = {"cpu_temperature": "the Pi's own: nothing to wire"}
SPACING = 1.5  # between two wires, in schemdraw's units
Part = Callable[[], Any]  # a two-terminal element, drawn vertically between two wires or along one


@dataclass
class Wire:
    pi: str  # the Pi's pin: "GPIO17", "3V3", "5V", "GND"
    part: str | None = None  # the part's pin it ends on; None: it ends where the parts between wires are
    series: list[tuple[Part, str]] = field(default_factory=list)  # elements along it, with their labels


@dataclass
class Picture:
    part: str | None  # the module's name, drawn as a box; None: no box (the parts between wires are all)
    wires: list[Wire]
    between: list[tuple[int, int, Part, str]] = field(default_factory=list)  # (wire, wire below, element, label)
    outputs: list[str] = field(default_factory=list)  # the module's other side: what it switches or drives
    note: str = ""


def gpio(pin: int) -> str:
    return f"GPIO{pin}"


def resistor(ohms: str) -> tuple[Part, str]:
    return elm.Resistor, ohms


def digital(entry: Any) -> Picture:
    pin = gpio(entry.pins()["pin"])
    if entry.kind == "button":  # to ground, the internal pull-up holding it high until pressed
        return Picture(None, [Wire(pin), Wire("GND")], [(0, 1, elm.Button, "")], note="internal pull-up: 1 pressed")
    supply = "5V" if entry.kind == "motion" else "3V3"  # a PIR module runs on 5 V, its output is 3.3 V
    name = {"motion": "PIR module", "line": "line sensor module"}[entry.kind]
    return Picture(name, [Wire(supply, "VCC"), Wire(pin, "OUT"), Wire("GND", "GND")])


def mcp3008(entry: Any) -> Picture:
    spi = entry.bus_pins()
    return Picture("MCP3008", [Wire("3V3", "VDD, VREF"), Wire(gpio(spi["clock"]), "CLK"),
                               Wire(gpio(spi["miso"]), "DOUT"), Wire(gpio(spi["mosi"]), "DIN"),
                               Wire(gpio(spi["chip_select"]), "CS/SHDN"), Wire("GND", "AGND, DGND")],
                   outputs=[f"CH{entry.channel}: 0..3.3 V in"], note="SPI0 (raspi-config nonint do_spi 0)")


def light(entry: Any) -> Picture:
    return Picture(None, [Wire("3V3"), Wire(gpio(entry.pins()["pin"])), Wire("GND")],
                   [(0, 1, elm.Photoresistor, "LDR"), (1, 2, elm.Capacitor, "1 µF")])


def distance(entry: Any) -> Picture:
    pins = entry.pins()
    return Picture("HC-SR04", [Wire("5V", "VCC"), Wire(gpio(pins["trigger"]), "TRIG"),
                               Wire(gpio(pins["echo"]), "ECHO", [resistor("1 kΩ")]), Wire("GND", "GND")],
                   [(2, 3, elm.Resistor, "2 kΩ")], note="ECHO is 5 V: the divider makes it 3.3 V")


def ds18b20(entry: Any) -> Picture:
    return Picture("DS18B20", [Wire("3V3", "VDD"), Wire(gpio(W1_GPIO), "DQ"), Wire("GND", "GND")],
                   [(0, 1, elm.Resistor, "4.7 kΩ")], note="1-wire (raspi-config nonint do_onewire 0)")


def relay(entry: Any) -> Picture:
    return Picture("relay board", [Wire("5V", "VCC"), Wire(gpio(entry.pins()["pin"]), "IN"), Wire("GND", "GND")],
                   [(1, 2, elm.Resistor, "10 kΩ")], outputs=["COM, NO: the load"],
                   note="a pull-down holds it off at boot (a pull-up to 3.3 V if active low)")


def pwm(entry: Any) -> Picture:
    return Picture("N-MOSFET (IRLZ44N)", [Wire(gpio(entry.pins()["pin"]), "G", [resistor("100 Ω")]),
                                          Wire("GND", "S")],
                   [(0, 1, elm.Resistor, "10 kΩ")], outputs=["D: the load's −"],
                   note="the load's + to its own supply (12 V); that supply's ground joined to the Pi's")


def servo(entry: Any) -> Picture:
    return Picture("servo", [Wire(gpio(entry.pins()["pin"]), "signal"), Wire("GND", "GND")],
                   outputs=["V+: its own 5 V supply"], note="grounds joined; never the Pi's 5 V")


def motor(entry: Any) -> Picture:
    pins = entry.pins()
    wires = [Wire(gpio(pins["forward"]), "IN1"), Wire(gpio(pins["backward"]), "IN2")]
    if "enable" in pins:
        wires.append(Wire(gpio(pins["enable"]), "ENA"))
    return Picture("H-bridge (L298N)", [*wires, Wire("GND", "GND")],
                   outputs=["OUT1, OUT2: the motor", "VS: motor supply"])


PICTURES: dict[str, Callable[[Any], Picture]] = {
    "motion": digital, "button": digital, "line": digital, "mcp3008": mcp3008, "light": light,
    "distance": distance, "ds18b20": ds18b20, "relay": relay, "pwm": pwm, "servo": servo, "motor": motor,
}


def draw(picture: Picture, title: str) -> bytes:
    """The picture as SVG: the Pi's pins from the top down, the wires straight across to the part."""
    schemdraw.use("svg")
    with schemdraw.Drawing(show=False, fontsize=11) as d:
        pins = [elm.IcPin(name=w.pi, side="right", anchorname=f"p{i}") for i, w in enumerate(picture.wires)]
        pi = elm.Ic(pins=list(reversed(pins)), pinspacing=SPACING, edgepadW=1.2, leadlen=0.4)
        pi.label("Raspberry Pi", loc="top")
        d += pi
        ends = []
        for index, wire in enumerate(picture.wires):
            d += (last := elm.Line().right(0.8).at(pi.absanchors[f"p{index}"]))
            for element, label in wire.series:
                d += (last := element().right().label(label))
            ends.append(last.end)
        reach = max(1, *(len(w.series) for w in picture.wires)) * 3.0 + 1.5
        x_end = pi.absanchors["p0"][0] + reach
        across = [x_end - 0.8 - 0.6 * (top % 2) for top, _, _, _ in picture.between]  # staggered: no two touch
        if picture.part is None:  # the wires end on the parts between them
            x_end = max(across)
        points = [(x_end, end[1]) for end in ends]
        for end, point in zip(ends, points):
            d += elm.Line().at(end).to(point)
        for x, (top, bottom, element, label) in zip(across, picture.between):
            d += elm.Dot().at((x, points[top][1]))
            d += element().at((x, points[top][1])).to((x, points[bottom][1])).label(label, loc="bottom")
            d += elm.Dot().at((x, points[bottom][1]))
        if picture.part is not None:
            _box(d, picture, picture.part, points)
        if picture.note:
            d += elm.Label().right().at((pi.absanchors["p0"][0] - 3.5, min(y for _, y in points) - 1.3)).label(
                picture.note, halign="left")
    d.config(bgcolor="white")
    svg = d.get_imagedata("svg")
    return svg if isinstance(svg, bytes) else svg.encode()


def _box(d: Any, picture: Picture, part: str, points: list[tuple[float, float]]) -> None:
    """The module (`part`), its pins facing the wires, its other side's connections as labels."""
    pins = [elm.IcPin(name=w.part or "", side="left", anchorname=f"m{i}") for i, w in enumerate(picture.wires)]
    outputs = [elm.IcPin(name=o, side="right", anchorname=f"o{i}") for i, o in enumerate(picture.outputs)]
    pins.reverse()  # a side's pins go from the bottom up: the first wire at the top
    outputs.reverse()
    text = max(len(w.part or "") for w in picture.wires) + max((len(o) for o in picture.outputs), default=0)
    box = elm.Ic(pins=[*pins, *outputs], pinspacing=SPACING, edgepadW=1.5 + 0.16 * text, leadlen=0.4)
    box.right().anchor("m0")
    box.at(points[0])
    box.label(part, loc="top")
    d += box


def pictures(config_path: Path = CONFIG) -> dict[str, bytes]:
    """Every wired kind's picture (SVG bytes) by kind, from the first device of that kind in the config."""
    settings = config.load(config_path)
    first: dict[str, Any] = {}
    entries: list[SensorSettings | ActuatorSettings] = [*settings.sensors, *settings.actuators]
    for entry in entries:
        first.setdefault(entry.kind, entry)
    missing = set(registry.SENSORS) | set(registry.ACTUATORS)
    missing -= set(first) & (set(PICTURES) | set(NO_WIRING))
    if missing:
        raise SystemExit(f"draw-wiring: no picture for {', '.join(sorted(missing))} (in {config_path} and here)")
    return {kind: draw(PICTURES[kind](entry), kind) for kind, entry in first.items() if kind in PICTURES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/images instead of writing")
    args = parser.parse_args()
    stale = []
    for kind, svg in pictures().items():
        path = IMAGES / f"wiring-{kind}.svg"
        if args.check:
            if not path.is_file() or path.read_bytes() != svg:
                stale.append(path.name)
        elif not path.is_file() or path.read_bytes() != svg:
            path.write_bytes(svg)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"draw-wiring: not what the script draws now: {', '.join(stale)}; run scripts/draw-wiring.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
