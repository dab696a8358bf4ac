"""`pi-controller simulate` and `pi-controller replay`: their arguments, the checks made before a long run
rather than after it, and the one ladder from what may go wrong to a line on stderr and an exit code.
The engines are `simulation` and `replay`; this module only reads arguments and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable

from pi_controller import config, logs
from pi_controller.devices.hardware import EXIT_HARDWARE, HardwareError
from pi_controller.devices.simulation import SimulationError
from pi_controller.files import open_to_write, path_argument, write_end
from pi_controller.plugins import checks
from pi_controller.sim import simulation
from pi_controller.sim.record import Playback, RecordingError
from pi_controller.sim.replay import replay

EXIT_CONFIG = 2  # the input's fault, as a config error is
EXIT_FAILED = 1
MAX_DAYS = 366  # of simulated time: a year of seasons in one run; a longer one is hours of a core at 1000 Hz

_RATE = next(f for f in dataclasses.fields(config.LoopSettings) if f.name == "rate_hz")  # its bounds


def add_commands(commands: Any) -> None:
    """Register `simulate` and `replay` on the CLI's subcommands (argparse's subparsers action)."""
    low, high = _RATE.metadata["low"], _RATE.metadata["high"]
    sim = commands.add_parser("simulate", help="run the loop and plugins against the models, faster than real time")
    sim.add_argument("--config", required=True, type=path_argument, help="YAML config file, with a simulation: section")
    sim.add_argument("--duration", type=parse_duration, default=parse_duration("24h"),
                     help=f"simulated time: 90s, 30m, 24h, 2d (default 24h; at most {MAX_DAYS}d)")
    sim.add_argument("--rate", type=_rate, help=f"ticks per simulated second, {low:g} to {high:g} "
                                                f"(default: the config's loop.rate_hz)")
    sim.add_argument("--seed", type=int, help="reseed the models' random numbers (default: the config's seeds)")
    sim.add_argument("--trace", type=path_argument, help="write a CSV trace, a row per tick, to this file")
    sim.add_argument("--record", type=path_argument, help="also record every tick to this file, for replay (.gz: gzip)")
    sim.add_argument("--plot", type=path_argument, help="draw the trace to this PNG (needs pi-controller[plot])")
    sim.add_argument("--from-recording", type=path_argument,
                     help="drive the sensors no model drives from this recording "
                          "(run --record or simulate --record)")
    sim.add_argument("--plugins", type=path_argument, help="plugins folder (overrides plugins.directory)")
    sim.add_argument("--log-format", choices=["console", "json"], default="console")
    sim.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                     help="the daemon's own events from this level on; the plugins' pi_log lines show from info on")
    sim.set_defaults(handler=simulate, plugin_log_level="info")  # what an author simulates for

    cmd = commands.add_parser("replay", help="feed a recording to plugins and compare their commands with it")
    cmd.add_argument("recording", type=path_argument, help="a file written by run --record or simulate --record")
    cmd.add_argument("--config", type=path_argument, help="config (default: the one recorded)")
    cmd.add_argument("--plugins", type=path_argument, help="plugins folder (default: the config's plugins.directory)")
    cmd.add_argument("--from", dest="start", type=parse_time, help="first tick: Unix seconds or ISO 8601 time")
    cmd.add_argument("--to", dest="end", type=parse_time, help="last tick: Unix seconds or ISO 8601 time")
    cmd.add_argument("--plot", type=path_argument,
                     help="draw the recorded and replayed actuator states over the readings "
                          "to this PNG (needs pi-controller[plot])")
    cmd.add_argument("--log-format", choices=["console", "json"], default="console")
    cmd.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="error")
    cmd.set_defaults(handler=replay_command)


# --- arguments ---------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '30m', '24h' or '2d'; at most MAX_DAYS."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match or float(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a duration such as 90s, 30m, 24h or 2d")
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    if seconds > MAX_DAYS * 86400:  # float() makes a number of 400 digits infinite, and this refuses it too
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is longer than the {MAX_DAYS}d a run may simulate")
    return seconds


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not _RATE.metadata["low"] <= value <= _RATE.metadata["high"]:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range; valid: {_RATE.metadata['low']:g} to "
                                         f"{_RATE.metadata['high']:g}")
    return value


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is neither Unix seconds nor an ISO 8601 time "
                                         "such as 2026-12-01T18:00:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# --- before a run ------------------------------------------------------------------------------


class CannotRun(Exception):
    """What the arguments would make fail, said before a long run rather than after it."""

    def __init__(self, message: str, code: int = EXIT_CONFIG):
        super().__init__(message)
        self.code = code


def unwritable(path: Path, held: contextlib.ExitStack) -> str | None:
    """Why a file cannot be written at `path` (checked before a run, not found after it), or None. A FIFO's
    reader is found by opening a write end, which `held` keeps until the command is done with the FIFO (`write_end`
    says why): then its reader's file ends, whether or not the command wrote to it."""
    folder = path.parent
    if path.is_dir():
        return "is a folder; give a file name"
    if path.is_fifo():
        end = write_end(path)
        if end is None:
            return "is a FIFO that nothing reads: writing to it would wait for good"
        held.callback(os.close, end)
    if not folder.is_dir():
        return f"the folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def _check_outputs(held: contextlib.ExitStack, **paths: Path | None) -> None:
    """Refused if matplotlib is missing for a plot or cannot draw to its suffix, or any of `paths` (by option)
    cannot be written; `held` keeps what the checks opened (`unwritable`)."""
    if paths.get("plot") and importlib.util.find_spec("matplotlib") is None:
        raise CannotRun("--plot needs matplotlib: pip install 'pi-controller[plot]'", EXIT_FAILED)
    for option, path in paths.items():
        problem = unwritable(path, held) if path else None
        if option == "plot" and path and not problem:
            from pi_controller.sim import plot

            problem = plot.unsupported(path)
        if problem:
            raise CannotRun(f"error: --{option} {path}: {problem}")


# --- the commands ------------------------------------------------------------------------------


def simulate(args: argparse.Namespace) -> int:
    return _reported(lambda held: _simulate(args, held), args.config, ("recording_error", "error"))


def replay_command(args: argparse.Namespace) -> int:
    return _reported(lambda held: _replay(args, held), args.recording, ("replay_error", "replay error"))


def _simulate(args: argparse.Namespace, held: contextlib.ExitStack) -> None:
    _check_outputs(held, plot=args.plot, trace=args.trace, record=args.record)
    settings = simulation.prepare(config.load(args.config), args.rate, args.seed)
    folder = config.check_plugins_directory(settings, args.plugins)  # a typo'd folder: not a run of no plugins
    checks.check(settings, folder)  # a plugin the config names that would not load: not a day without it
    try:
        playback = Playback(args.from_recording) if args.from_recording else None
    except (RecordingError, OSError) as exc:
        raise RecordingError(f"--from-recording {args.from_recording}: {exc}") from exc
    buckets = None
    with contextlib.ExitStack() as files:
        sinks: list[simulation.Sink] = [simulation.Progress(simulation.ticks_in(settings, args.duration),
                                                            settings.loop.period)]
        if args.trace:
            trace = io.TextIOWrapper(open_to_write(args.trace), encoding="utf-8", newline="")
            sinks.append(simulation.TraceWriter(files.enter_context(trace)))
        if args.plot:
            from pi_controller.sim import plot

            buckets = plot.Buckets(periods=plot.periods(settings))
            sinks.append(buckets)
        verdict = simulation.run(settings, args.duration, sinks, args.plugins, args.record, playback)
    written = [f"{what}: {path}" for what, path in (("trace", args.trace), ("recording", args.record)) if path]
    print("\n".join([*verdict.lines(), *written]))
    if buckets is not None:
        plot.draw(buckets, verdict, args.plot)
        print(f"plot: {args.plot}")


def _replay(args: argparse.Namespace, held: contextlib.ExitStack) -> None:
    _check_outputs(held, plot=args.plot)
    settings = config.load(args.config) if args.config else None
    report = replay(args.recording, settings, args.plugins, args.start, args.end, args.plot)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _reported(work: Callable[[contextlib.ExitStack], None], subject: Path, recording_error: tuple[str, str]) -> int:
    """`work(held)`, `held` closed when it returns (the outputs' checks keep in it what they opened), and the one
    ladder from what it may raise to a refusal (`logs.refusal`: a line on stderr, or one JSON event) and an exit
    code: a bad argument, config, model wiring or recording is 2, as a config error is; hardware that does not
    answer is 3 (systemd retries it). `subject` is the file an error names; `recording_error` the event a
    recording's error is and what its line starts with."""
    event, prefix = recording_error
    try:
        with contextlib.ExitStack() as held:
            work(held)
    except CannotRun as exc:
        logs.refusal("argument_error", str(exc))
        return exc.code
    except config.ConfigError as exc:
        exc.refuse()
        return EXIT_CONFIG
    except SimulationError as exc:
        logs.refusal("simulation_error", f"simulation error: {subject}: {exc}", file=str(subject))
        return EXIT_CONFIG
    except HardwareError as exc:
        logs.refusal("hardware_error", f"hardware error: {exc}")
        return EXIT_HARDWARE
    except RecordingError as exc:
        logs.refusal(event, f"{prefix}: {exc}")
        return EXIT_CONFIG
    except OSError as exc:
        logs.refusal(event, f"{prefix}: {exc.filename or subject}: {exc.strerror or exc}")
        return EXIT_CONFIG
    return 0
