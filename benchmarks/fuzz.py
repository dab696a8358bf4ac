"""The fuzz suite on long budgets: every input from outside, each target in a child process of its own.

For each target of tests/fuzz_targets.py (plugin file bytes, configs, manifests, plugin outputs,
contexts for `plugin call`, MQTT command payloads), runs `python -m tests.fuzz_targets TARGET N SEED`
and prints the inputs tried, crashes (the child killed by a signal: an abort), findings (an exception
other than the target's refusal; hypothesis prints the input), hangs (past --timeout) and the peak RSS of the
children (the fuzzers, and for plugin files their trial-compile children).

    python benchmarks/fuzz.py [--examples 2000] [--seed 1] [--timeout 1800] [TARGET ...]
"""

from __future__ import annotations

import argparse
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzz_targets import TARGETS

# Plugin files cost a trial compile in a child each (~0.2 s): fewer of them in the same budget.
SHARE = {"module_bytes": 0.1, "context": 0.2}


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
    return {"target": target, "inputs": int(tried[-1].split()[1]) if tried else "?", "seconds": round(time.perf_counter() - started, 1),
            "crashes": int(code is not None and code < 0 and not hang), "findings": int(code is not None and code > 0),
            "hangs": int(hang), "signal": signal.Signals(-code).name if code and code < 0 else None,
            "output": output[-4000:] if code else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", default=list(TARGETS), help=f"some of: {', '.join(TARGETS)}")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per target before it is a hang")
    args = parser.parse_args()
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
