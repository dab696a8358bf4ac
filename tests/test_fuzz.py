"""The fuzz suite on short budgets (benchmarks/fuzz.py runs it long): nothing from outside may raise
anything but its refusal, hang, or abort the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.fuzz_targets import run

pytestmark = pytest.mark.slow  # hundreds of generated inputs per target


def test_plugin_file_bytes_never_abort_the_process() -> None:
    """In a child: an abort there fails this test instead of ending pytest."""
    done = subprocess.run([sys.executable, "-m", "tests.fuzz_targets", "module_bytes", "40"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("target, examples", [
    ("config", 60), ("manifest", 60), ("plugin_output", 300), ("context", 40), ("payload", 300)])
def test_inputs_from_outside_get_only_their_refusal(target: str, examples: int) -> None:
    run(target, examples)()


@pytest.mark.parametrize("context, message", [
    ("not json", "error: the context is not JSON"),
    ("[1, 2]", "error: the context must be a JSON object"),
    ('{"sensor_readings": [{"sensor_id": "x", "value": "warm"}]}', "error: value in sensor_readings[0] has the wrong"),
])
def test_plugin_call_refuses_a_context_off_the_contract_in_one_line(tmp_path, context: str, message: str) -> None:
    path = tmp_path / "context.json"
    path.write_text(context)
    done = subprocess.run([sys.executable, "-m", "pi_controller", "plugin", "call",
                           str(REPO / "plugins" / "motion_light.wasm"), "--context", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1


FAILS_AT_ITS_START = """
import sys
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from benchmarks import fuzz


class Machine(RuleBasedStateMachine):
    examples, steps = 0, 0

    @initialize()
    def start(self):
        raise RuntimeError("the broker did not start")

    @invariant()
    def counted(self):
        type(self).steps += 1

    @rule()
    def step(self):
        pass


sys.exit(1 if fuzz.rounds(Machine, settings(max_examples=2, database=None, deadline=None), 10, 1) else 0)
"""


def test_long_fuzzing_of_a_machine_that_fails_at_its_start_ends() -> None:
    """`fuzz.py --stateful [--entities]` runs rounds until its steps are counted: a machine whose every sequence
    fails before its first step (its broker not starting, the daemon's first check failing) counts none, and
    the run went on for good, a finding a round."""
    done = subprocess.run([sys.executable, "-c", FAILS_AT_ITS_START], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "the broker did not start" in done.stdout, done.stdout[-2000:] + done.stderr
