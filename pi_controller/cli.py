"""`pi-controller`: run the daemon, check a config, build plugins."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
from pathlib import Path
from typing import NoReturn

import structlog

from pi_controller import config, logs
from pi_controller.files import path_argument
from pi_controller.fleet import tool as fleet_tool
from pi_controller.plugins import build, checks, install, shadow, signing_cli, tools
from pi_controller.safety import known_good, safe_state
from pi_controller.sim import commands as sim_commands

EXIT_CONFIG = 2
MAX_TICKS = 10**9  # three years at 10 Hz: a longer run is one without --ticks, ended by a signal

log = structlog.get_logger("pi_controller.cli")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logs.configure(logs.asked_format(argv))  # argparse's own refusals follow --log-format too
    args = _parser().parse_args(argv)
    logs.configure(getattr(args, "log_format", "console"), getattr(args, "log_level", "info"),
                   getattr(args, "plugin_log_level", None))
    return int(args.handler(args))


class Parser(argparse.ArgumentParser):
    """argparse, whose refusals follow --log-format: with JSON, one event instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        if not logs.is_json():
            super().error(message)
        logs.refusal("usage_error", f"{self.prog}: error: {message}")
        self.exit(EXIT_CONFIG)


def version() -> str:
    """This version, the Wasm runtime's and where it runs: what a bug report needs first."""
    from importlib.metadata import version as installed

    from pi_controller import __version__

    return (f"pi-controller {__version__} (extism-sys {installed('extism-sys')}, Python {platform.python_version()}, "
            f"{platform.machine()})")


def entry() -> NoReturn:
    """The console script: `main`, then an exit that leaves the actuator pins as they were set."""
    from pi_controller.devices.pins import exit_holding_pins

    logs.capture_native_stderr()
    logs.write_off_thread()  # no tick waits on stderr
    try:
        code = main()
    finally:
        logs.flush()
    exit_holding_pins(code)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pi-controller", description=__doc__)
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the control loop")
    run.add_argument("--config", required=True, type=path_argument, help="YAML config file")
    run.add_argument("--simulate", action="store_true", help="mock pins driven by the simulation models")
    run.add_argument("--ticks", type=_positive,
                     help=f"run N ticks (at most {MAX_TICKS}), then print a JSON snapshot and exit")
    run.add_argument("--plugins", type=path_argument, help="plugins folder (overrides plugins.directory)")
    run.add_argument("--record", type=path_argument, help="record every tick to this file, for replay (.gz: gzip; "
                                                          "overrides record.path)")
    run.add_argument("--state-dir", type=path_argument, default=known_good.state_directory(),
                     help="keep the config it runs with here, for safe-state (default: $STATE_DIRECTORY)")
    run.add_argument("--log-format", choices=["console", "json"], default="console")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate a config file without touching a pin")
    check.add_argument("path", type=path_argument, nargs="?", help="YAML config file (or --config)")
    check.add_argument("--config", type=path_argument, help="YAML config file, as the other commands take it")
    check.add_argument("--plugins", type=path_argument, help="plugins folder (overrides plugins.directory)")
    check.add_argument("--state-dir", type=path_argument, default=known_good.state_directory(),
                       help="the service's StateDirectory= (default: $STATE_DIRECTORY, which systemd sets for the "
                            "unit's ExecReload= check): where a recording may be written under the unit")
    check.set_defaults(handler=_check_config)
    sim_commands.add_commands(commands)

    safe_state.add_command(commands)

    plugin = commands.add_parser("plugin", help="plugin tools")
    plugin_commands = plugin.add_subparsers(required=True, metavar="ACTION")
    build.add_command(plugin_commands)
    tools.add_commands(plugin_commands)
    install.add_command(plugin_commands)
    signing_cli.add_commands(plugin_commands)
    shadow.add_command(plugin_commands)
    fleet_tool.add_command(commands)
    return parser


def _positive(text: str) -> int:
    digits = text.strip().lstrip("+").lstrip("0")  # leading zeros say nothing of the size, and int() counts them
    if digits.isdecimal() and len(digits) > len(str(MAX_TICKS)):  # before int(), which refuses 4300 digits
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TICKS}")
    try:
        value = int(digits if digits.isdecimal() else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if not 1 <= value <= MAX_TICKS:
        raise argparse.ArgumentTypeError("must be 1 or more" if value < 1 else f"must be at most {MAX_TICKS}")
    return value


def _load(path: Path, plugins_dir: Path | None = None) -> tuple[config.Settings, list[str]] | None:
    """The config, with the plugins folder it would run (or `plugins_dir`) checked too, as the daemon would
    load it (`checks`): and what of the folder it would not load, not the config's doing, one line each."""
    try:
        settings = config.load(path)
        notes = checks.check(settings, config.check_plugins_directory(settings, plugins_dir))
        if settings.mqtt.enabled:  # its credentials too, before any pin moves (simulate and replay never need them)
            config.mqtt_secrets(settings)
        return settings, notes
    except config.ConfigError as exc:  # said once, on stderr (the journal under systemd), in one line
        exc.refuse()
        return None


def _run(args: argparse.Namespace) -> int:
    loaded = _load(args.config, plugins_dir=args.plugins)
    if loaded is None:
        return EXIT_CONFIG
    settings, _ = loaded  # what of the folder fails to load, the daemon logs as it loads it
    problem = known_good.unusable(args.state_dir, make=True) if args.state_dir else None
    if problem:  # a daemon that could not keep its state: said before any pin moves
        logs.refusal("state_dir_error", f"error: state directory {args.state_dir}: {problem}")
        return EXIT_CONFIG
    with contextlib.ExitStack() as held:  # what the check opened: a FIFO's reader sees its end when the run ends
        problem = sim_commands.unwritable(args.record, held) if args.record else None
        if problem:  # asked for on the command line: said before any pin moves (record.path never stops control)
            logs.refusal("recording_error", f"error: --record {args.record}: {problem}")
            return EXIT_CONFIG
        return _serve(args, settings)


def _serve(args: argparse.Namespace, settings: config.Settings) -> int:
    """The daemon of `settings`, from its start to its actuators held safe; the exit code."""
    import asyncio

    from pi_controller.daemon import Daemon
    from pi_controller.devices.hardware import EXIT_HARDWARE, HardwareError
    from pi_controller.devices.pins import hold
    from pi_controller.devices.simulation import SimulationError

    try:
        daemon = Daemon(settings, simulate=args.simulate, plugins_dir=args.plugins, state_dir=args.state_dir,
                        record=args.record)
    except SimulationError as exc:
        logs.refusal("simulation_error", f"simulation error: {args.config}: {exc}", file=str(args.config))
        return EXIT_CONFIG
    except HardwareError as exc:  # said once, in one line, as a config error is
        logs.refusal("hardware_error", f"hardware error: {exc}")
        return EXIT_HARDWARE
    except config.ConfigError as exc:  # a credential file gone since it was checked
        exc.refuse()
        return EXIT_CONFIG
    except Exception:  # anything else at start-up: say what, exit non-zero (ExecStopPost makes pins safe)
        log.exception("startup_failed")
        return 1
    try:
        asyncio.run(daemon.serve(args.ticks))
        if args.ticks:  # before closing: closing unloads the plugins the snapshot reports on
            json.dump(daemon.status.snapshot(), sys.stdout, indent=2)
            sys.stdout.write("\n")
    except Exception:  # a bug of ours: actuators are already safe (serve's finally); say what happened
        log.exception("daemon_crashed")
        return 1
    finally:
        daemon.close()
        hold(a.device for a in daemon.hardware.actuators.values())
    return 0


def _as_reloaded(settings: config.Settings, args: argparse.Namespace) -> list[str]:
    """Beside a daemon running another loop (the unit's ExecReload= check): the plugins judged as its reload will
    judge them, at its rate (ConfigError as the reload's refusal), and a line saying the rate waits for a restart."""
    running = known_good.running_loop(args.state_dir) if args.state_dir else None
    if running is None or running == settings.loop:
        return []
    notes = checks.check_reload(settings, running, config.check_plugins_directory(settings, args.plugins))
    return notes + [f"loop: the running daemon keeps {running.rate_hz:g} Hz at a reload (plugin budget "
                    f"{running.plugin_budget_ms:g} ms); this file's {settings.loop.rate_hz:g} Hz applies at a restart"]


def _check_config(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.config is None):
        print("error: check-config takes one config file: PATH or --config PATH", file=sys.stderr)
        return EXIT_CONFIG
    path = args.path or args.config
    loaded = _load(path, args.plugins)
    if loaded is None:
        return EXIT_CONFIG
    settings, notes = loaded
    try:
        notes += config.check_service_paths(settings, args.state_dir)
        notes += _as_reloaded(settings, args)
    except config.ConfigError as exc:
        exc.refuse()
        return EXIT_CONFIG
    problem = known_good.unusable(args.state_dir, make=False) if args.state_dir else None
    if problem:  # a warning: the unit's ExecReload= runs this check, and a running daemon reloads all the same
        notes.append(f"state directory {args.state_dir}: {problem} (`run` refuses to start with it; a running "
                     "daemon applies this config without keeping a copy)")
    for note in dict.fromkeys(notes):  # a note of the file's loop and the running one's alike: once
        print(f"warning: {note}", file=sys.stderr)
    print(f"{path}: OK ({len(settings.sensors)} sensors, {len(settings.actuators)} actuators, "
          f"plugins from {args.plugins or settings.plugins_directory()})")
    return 0

