"""The fuzz suite on long budgets: every input from outside, each target in a child process of its own.

For each target of tests/fuzz_targets.py (plugin file bytes, configs, manifests, plugin outputs,
contexts for `plugin call`, MQTT command payloads), runs `python -m tests.fuzz_targets TARGET N SEED`
and prints the inputs tried, crashes (the child killed by a signal: an abort), findings (an exception
other than the target's refusal; hypothesis prints the input), hangs (past --timeout) and the peak RSS of the
children (the fuzzers, and for plugin files their trial-compile children).

    python benchmarks/fuzz.py [--examples 2000] [--seed 1] [--timeout 1800] [TARGET ...]

With `--stateful`, runs the state machine of tests/daemon_machine.py instead (the real daemon under any
sequence of events, every safety invariant after each step) until `--steps` steps have run, in rounds of
random sequences (seeds `--seed`, `--seed`+1, ...); a round ends early at a violation, printed with the
sequence that shows it, shrunk. `--invariant NAME` judges only those invariants (tests/invariants.py);
`--matching REGEX` counts only violations whose message matches; `--leave-out RULE` never runs those
rules (to look for one kind of finding while another is known). It prints the steps, sequences and
failures found.

    python benchmarks/fuzz.py --stateful [--steps 100000] [--seed 1] [--invariant NAME ...] [--matching REGEX]
                              [--leave-out RULE ...]

With `--stateful --entities`, the state machine of tests/test_mqtt_entities.py instead: the daemon, a real
mosquitto and what a fresh subscriber (Home Assistant) finds retained after each step; rounds of 20 sequences of
up to 30 steps (the suite's: 15), with up to `--outages` broker restarts in each (the suite's: one; each costs
seconds of real time). A step takes a second or more: thousands of steps are hours.

    python benchmarks/fuzz.py --stateful --entities [--steps 2000] [--seed 1] [--outages 4]
"""

from __future__ import annotations

import argparse
import importlib
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzz_targets import TARGETS

# Plugin files cost a trial compile in a child each (~0.2 s): fewer of them in the same budget.
SHARE = {"module_bytes": 0.1, "context": 0.2}
ROUND_EXAMPLES = 200  # sequences per round of --stateful
ENTITIES_ROUND_EXAMPLES = 20  # of --stateful --entities, whose steps take a second or more


def fuzz(target: str, examples: int, seed: int, timeout: float) -> dict[str, object]:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tests.fuzz_targets", target, str(examples), str(seed)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = child.communicate(timeout=timeout)
        hang = False
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
        hang = True
    code = child.returncode
    tried = [line for line in output.splitlines() if line.startswith("tried ")]
    return {"target": target, "inputs": int(tried[-1].split()[1]) if tried else "?",
            "seconds": round(time.perf_counter() - started, 1),
            "crashes": int(code is not None and code < 0 and not hang), "findings": int(code is not None and code > 0),
            "hangs": int(hang), "signal": signal.Signals(-code).name if code and code < 0 else None,
            "output": output[-4000:] if code else ""}


def stateful(steps: int, seed: int, judged: list[str], matching: str | None, leaving_out: list[str]) -> bool:
    """Rounds of the daemon's state machine until `steps` steps; whether any found a violation."""
    from hypothesis import settings

    from tests.daemon_machine import IN_SUITE, checking

    machine = checking(*judged, matching=matching, leaving_out=leaving_out)
    return rounds(machine, settings(IN_SUITE, max_examples=ROUND_EXAMPLES, derandomize=False), steps, seed)


def entities(steps: int, seed: int, outages: int) -> bool:
    """Rounds of the entities machine (the daemon against a real broker, judged from a subscriber's side) until
    `steps` steps; whether any found a violation."""
    from hypothesis import settings

    # By name: the module imports benchmarks/flood.py as `benchmarks.flood`, which mypy, reading this folder's
    # files as top-level modules, would find twice.
    module = importlib.import_module("tests.test_mqtt_entities")
    machine = type("EntitiesMachine_long", (module.EntitiesMachine,), {"max_outages": outages, "examples": 0,
                                                                      "steps": 0})
    return rounds(machine, settings(module.IN_SUITE, max_examples=ENTITIES_ROUND_EXAMPLES, stateful_step_count=30,
                                     derandomize=False), steps, seed)


def rounds(machine: Any, each: Any, steps: int, seed: int) -> bool:
    """Rounds of `machine` under the settings `each`, seeds `seed`, `seed`+1, ..., until `steps` steps; whether any
    found a violation."""
    from hypothesis import seed as seeded
    from hypothesis.stateful import get_state_machine_test

    found, started, number = 0, time.perf_counter(), 0
    print(f"{'round':>5} {'seed':>6} {'steps':>8} {'sequences':>10} {'failures':>9} {'seconds':>8}", flush=True)
    while machine.steps < steps:
        before = machine.steps
        try:
            seeded(seed + number)(get_state_machine_test(machine, settings=each))()
        except Exception as exc:  # whatever a sequence raised is a finding, printed with it
            for finding in exc.exceptions if isinstance(exc, ExceptionGroup) else [exc]:
                found += 1
                print(f"found: {type(finding).__name__}: {finding}\n" + "\n".join(getattr(finding, "__notes__", [])),
                      flush=True)
        print(f"{number:>5} {seed + number:>6} {machine.steps:>8} {machine.examples:>10} {found:>9} "
              f"{time.perf_counter() - started:>8.0f}", flush=True)
        number += 1
        if machine.steps == before:  # every sequence failed before its first step: every round would, for good
            print("no step ran in the round: the machine fails at its start", flush=True)
            break
    print(f"steps {machine.steps}, sequences {machine.examples}, failures found {found}, "
          f"{time.perf_counter() - started:.0f} s")
    return found > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", default=list(TARGETS), help=f"some of: {', '.join(TARGETS)}")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per target before it is a hang")
    parser.add_argument("--stateful", action="store_true", help="the daemon's state machine instead of the targets")
    parser.add_argument("--steps", type=int, default=100_000, help="--stateful: steps to run")
    parser.add_argument("--invariant", action="append", default=[], help="--stateful: judge only this one")
    parser.add_argument("--matching", help="--stateful: count only violations whose message matches this")
    parser.add_argument("--leave-out", action="append", default=[], help="--stateful: never run this rule")
    parser.add_argument("--entities", action="store_true", help="--stateful: the entities machine (MQTT, a broker)")
    parser.add_argument("--outages", type=int, default=4, help="--entities: broker restarts in a sequence, at most")
    args = parser.parse_args()
    if args.stateful and args.entities:
        sys.exit(1 if entities(args.steps, args.seed, args.outages) else 0)
    if args.stateful:
        sys.exit(1 if stateful(args.steps, args.seed, args.invariant, args.matching, args.leave_out) else 0)
    print(f"{'target':<14} {'inputs':>7} {'crashes':>8} {'findings':>9} {'hangs':>6} {'seconds':>8}")
    failed = False
    for target in args.targets:
        examples = max(10, int(args.examples * SHARE.get(target, 1.0)))
        result = fuzz(target, examples, args.seed, args.timeout)
        print(f"{target:<14} {result['inputs']:>7} {result['crashes']:>8} {result['findings']:>9} "
              f"{result['hangs']:>6} {result['seconds']:>8}")
        if result["output"]:
            failed = True
            print(result["output"])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak RSS of any child (fuzzer or trial compile): {peak / 1024:.0f} MiB")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
