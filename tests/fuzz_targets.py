"""What the fuzz suite feeds, and to what: hypothesis strategies and one target per input from outside.

Each target takes one input the way the daemon does and allows only the refusals it is meant to
give (ConfigError, Refused, OutputError, Rejected, ValueError); anything else raised is a finding.
Plugin file bytes can abort the process if the gate lets the wrong thing through, so that target
runs in a child (`python -m tests.fuzz_targets module_bytes EXAMPLES SEED`): one abort fails a test
instead of ending pytest. `tests/test_fuzz.py` runs short budgets, `benchmarks/fuzz.py` long ones.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pi_controller import config, contract, operator
from pi_controller.config import PluginsSettings
from pi_controller.devices import actuators
from pi_controller.devices.mock_pins import SimulatedFactory
from pi_controller.mqtt import inbox
from pi_controller.plugins import tools
from pi_controller.plugins.manifest import Manifest, Refused, load_manifest
from pi_controller.plugins.plugin_set import PluginSet

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted((REPO / "plugins").glob("*.wasm")) + sorted((REPO / "plugins" / "examples").glob("*.wasm"))
CONFIGS = [REPO / "config" / "example.yaml"]
MANIFESTS = sorted((REPO / "plugins" / "examples").glob("*.yaml"))


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A real input with a few bytes flipped, inserted, cut or the whole truncated."""

    @st.composite
    def mutate(draw: Any) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, max(0, len(data) - 1)))
            match draw(st.sampled_from(["flip", "insert", "cut", "truncate"])):
                case "flip" if data:
                    data[at] = draw(st.integers(0, 255))
                case "insert":
                    data[at:at] = draw(st.binary(min_size=1, max_size=16))
                case "cut":
                    del data[at:at + draw(st.integers(1, 64))]
                case "truncate":
                    del data[at:]
        return bytes(data)

    return mutate()


def module_bytes() -> st.SearchStrategy[bytes]:
    real = [p.read_bytes() for p in MODULES]
    return st.one_of(mutated(real), st.binary(max_size=64), st.binary(max_size=8).map(lambda b: b"\0asm" + b))


def check_module_bytes(data: bytes) -> None:
    """Gate, trial compile and compile, as a hot reload does: a status, never an exception."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "fuzzed.wasm").write_bytes(data)
        plugins = PluginSet(PluginsSettings(), Path(folder), budget_ms=1000)
        update = plugins.prepare({"fuzzed"})
        assert set(update.loaded) | set(update.refused) == {"fuzzed"}
        update.close()


def yaml_text(paths: list[Path]) -> st.SearchStrategy[str]:
    """Real YAML with bytes mutated, or lines dropped, repeated or swapped."""
    texts = [p.read_text() for p in paths]

    @st.composite
    def lines(draw: Any) -> str:
        rows = draw(st.sampled_from(texts)).splitlines()
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(rows) - 1))
            match draw(st.sampled_from(["drop", "repeat", "swap", "indent"])):
                case "drop":
                    del rows[at]
                case "repeat":
                    rows.insert(at, rows[at])
                case "swap":
                    rows[at] = rows[draw(st.integers(0, len(rows) - 1))]
                case "indent":
                    rows[at] = "  " + rows[at]
            if not rows:
                break
        return "\n".join(rows) + "\n"

    return st.one_of(lines(), mutated([t.encode() for t in texts]).map(lambda b: b.decode("utf-8", "replace")))


def check_config(text: str) -> None:
    try:
        config.parse(text, Path("fuzzed.yaml"))
    except config.ConfigError:
        pass


def check_manifest(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "fuzzed.yaml").write_text(text)
        try:
            assert isinstance(load_manifest(Path(folder) / "fuzzed.wasm"), Manifest)
        except Refused:
            pass


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=16)
_IDS = ["relay_switch", "led_strip", "servo_motor", "nope", ""]
_ACTIONS = ["set_high", "set_low", "pwm", "set_angle", "detach", "x"]
_PARAMETERS = st.dictionaries(st.sampled_from(["duty_cycle", "angle", "x"]), _JSON, max_size=3)
_COMMAND = st.fixed_dictionaries({}, optional={"device_id": st.sampled_from(_IDS) | _JSON,
                                               "action": st.sampled_from(_ACTIONS) | _JSON, "parameters": _PARAMETERS})


def plugin_output() -> st.SearchStrategy[bytes]:
    return st.one_of(st.lists(_COMMAND | _JSON, max_size=8).map(lambda v: json.dumps(v).encode()),
                     _JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64))


def _targets() -> dict[str, Any]:
    factory = SimulatedFactory()
    settings = config.load(CONFIGS[0])
    return {a.id: actuators.build(a, factory) for a in settings.actuators}


def check_plugin_output(raw: bytes, targets: dict[str, Any]) -> None:
    try:
        commands, rejections = contract.parse_output(raw, "fuzzed", 0, targets)
    except contract.OutputError:
        return
    assert all(c.device_id in targets for c in commands)
    assert all(r.device_id is None or r.device_id in targets for r in rejections)


_READING = st.fixed_dictionaries({"sensor_id": st.sampled_from(["light_sensor", "x"])},
                                 optional={"value": _JSON, "unit": _JSON, "timestamp": _JSON, "error": _JSON})


def context() -> st.SearchStrategy[Any]:
    return st.one_of(_JSON, st.fixed_dictionaries({}, optional={
        "sensor_readings": st.lists(_READING | _JSON, max_size=3), "device_states": _JSON, "timestamp": _JSON,
        "tick": _JSON, "config": _JSON, "history": _JSON}))


def check_context(data: Any, wasm: Path, settings: config.Settings) -> None:
    """`plugin call` on a context from a file: a report, or a one-line error, never a traceback."""
    try:
        report = tools.call_once(wasm, data, settings)
    except (tools.ContextError, tools.LoadFailed):
        return
    json.dumps(report)


def check_payload(payload: bytes, targets: dict[str, Any]) -> None:
    """Through every command's row of the inbox: a request, or the refusal answered on /result; a set
    then read for every kind of actuator as the operator reads it."""
    for parse in inbox.COMMANDS.values():
        try:
            request = parse(("x", "key"), payload, "reply")
        except contract.Rejected:  # too large, not ON/OFF, not finite
            continue
        if isinstance(request, operator.SetActuator):
            for actuator in targets.values():
                try:
                    operator.parse_set(actuator, request.payload)
                except (contract.Rejected, ValueError):
                    pass


def payload() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=2048), _JSON.map(lambda v: json.dumps(v).encode()),
                     st.sampled_from([b"ON", b"OFF", b"1e999", b"NaN", b'{"state": "ON", "brightness": 1e400}']))


def run(name: str, examples: int, seed: int | None = None) -> Callable[[], None]:
    """A test function that feeds target `name` `examples` inputs."""
    targets = _targets() if name in ("plugin_output", "payload") else {}
    call_settings = tools.settings_for({"device_states": {i: {"type": "relay"} for i in _IDS[:2]}})
    table: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
        "module_bytes": (module_bytes(), check_module_bytes),
        "config": (yaml_text(CONFIGS), check_config),
        "manifest": (yaml_text(MANIFESTS), check_manifest),
        "plugin_output": (plugin_output(), lambda raw: check_plugin_output(raw, targets)),
        "context": (context(), lambda data: check_context(data, MODULES[0], call_settings)),
        "payload": (payload(), lambda data: check_payload(data, targets)),
    }
    strategy, check = table[name]

    def counted(value: Any) -> None:
        tried[0] += 1
        check(value)

    tried = [0]
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                    suppress_health_check=list(HealthCheck))(given(strategy)(counted))
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    test.tried = tried  # type: ignore[attr-defined]
    return test


TARGETS = ("module_bytes", "config", "manifest", "plugin_output", "context", "payload")

if __name__ == "__main__":
    fuzz = run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
    try:
        fuzz()
    finally:
        print(f"tried {fuzz.tried[0]}")  # type: ignore[attr-defined]
