"""docs/wiring.md's pictures are what scripts/draw-wiring.py draws from config/every-kind.yaml now: a kind added
without its picture, a pin moved in the config or a change to a drawing shows here, not in an owner's wiring."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pi_controller.devices import registry
from tests.conftest import REPO

pytest.importorskip("schemdraw", reason="the wiring pictures need pi-controller[wiring]")


def draw_wiring() -> ModuleType:
    spec = importlib.util.spec_from_file_location("draw_wiring", REPO / "scripts" / "draw-wiring.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["draw_wiring"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_kind_is_drawn_or_needs_no_wiring() -> None:
    script = draw_wiring()
    kinds = set(registry.SENSORS) | set(registry.ACTUATORS)
    assert set(script.PICTURES) | set(script.NO_WIRING) == kinds
    assert not set(script.PICTURES) & set(script.NO_WIRING)


def test_the_committed_pictures_are_what_the_script_draws_now() -> None:
    drawn = draw_wiring().pictures()
    committed = {path.name for path in (REPO / "docs" / "images").glob("wiring-*.svg")}
    assert committed == {f"wiring-{kind}.svg" for kind in drawn}, "run scripts/draw-wiring.py"
    for kind, svg in drawn.items():
        assert (REPO / "docs" / "images" / f"wiring-{kind}.svg").read_bytes() == svg, \
            f"wiring-{kind}.svg is stale: run scripts/draw-wiring.py"


def test_the_pictures_name_the_config_s_pins_and_the_docs_show_them(tmp_path: Path) -> None:
    script = draw_wiring()
    text = (REPO / "config" / "every-kind.yaml").read_text().replace("pin: 27", "pin: 22")
    moved = tmp_path / "every-kind.yaml"
    moved.write_text(text.replace("directory: ../plugins", f"directory: {REPO / 'plugins'}"))
    relay = script.pictures(moved)["relay"].decode()
    assert ">GPIO22<" in relay and ">GPIO27<" not in relay  # the config's pin, as the daemon would claim it
    wiring = (REPO / "docs" / "wiring.md").read_text()
    shown = set(re.findall(r"\(images/(wiring-[a-z0-9_]+\.svg)\)", wiring))
    assert shown == {f"wiring-{kind}.svg" for kind in script.PICTURES}
