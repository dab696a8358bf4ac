"""`pi-controller safe-state`: every actuator it can identify, claimed directly in its safe state.

systemd runs it as ExecStopPost=, after a crash, a SIGKILL or a failed start, when nothing of the daemon
is left to do it; so it loads no plugins and no Extism, and nothing it reads may keep it from the pins.
The actuators come from, in order:
1. the config the daemon last ran with (`known_good`, in the state directory): what the dead process drove;
2. the config file: all of it when it is valid, else every actuator entry that converts on its own.
An actuator on a pin an earlier source already names is left to that one. After a clean stop (systemd
says so in $SERVICE_RESULT) the pins already hold their shut-down states and nothing is done.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from pi_controller import config
from pi_controller.config import Settings
from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.files import path_argument
from pi_controller.safety import known_good

log = structlog.get_logger("pi_controller.safe_state")

EXIT_NOTHING_FOUND = 2  # as a config error: no actuator could be identified, nothing was done


def add_command(commands: Any) -> None:
    """Register `safe-state` on the CLI's subcommands (argparse's subparsers action)."""
    safe = commands.add_parser("safe-state", help="drive every actuator of a config to its safe state and exit "
                                                  "(systemd's ExecStopPost=, after a crash)")
    safe.add_argument("--config", required=True, type=path_argument, help="YAML config file")
    safe.add_argument("--state-dir", type=path_argument, default=known_good.state_directory(),
                      help="where the daemon keeps the config it last ran with (default: $STATE_DIRECTORY)")
    safe.add_argument("--simulate", action="store_true", help="on mock pins")
    safe.add_argument("--log-format", choices=["console", "json"], default="console")
    safe.set_defaults(handler=command)


def command(args: argparse.Namespace) -> int:
    from pi_controller.devices.hardware import EXIT_HARDWARE, HardwareError
    from pi_controller.devices.pins import make_factory

    if os.environ.get("SERVICE_RESULT") == "success":  # systemd's verdict on the run that just ended
        log.info("safe_state_skipped", reason="the daemon stopped cleanly, leaving its shut-down states")
        return 0
    read = [r for r in (_known_good(args.state_dir), _read(args.config, "the config file")) if r is not None]
    sources = [r.settings for r in read if r.settings is not None]
    entries = _by_pin(sources)
    if not entries:  # one line: nothing done, and why, each config's problem in it
        log.error("safe_state_failed", error="no actuator found: no config the daemon ran with, and none in "
                                             f"{args.config}", state_dir=str(args.state_dir),
                  invalid=[str(r.invalid) for r in read if r.invalid is not None])
        return EXIT_NOTHING_FOUND
    for r in read:  # one line each: where and why, and what of it is used
        if r.invalid is not None:
            log.warning("safe_state_config_invalid", file=r.invalid.file, line=r.invalid.line,
                        key=config.format_path(r.invalid.path), problem=r.invalid.message, **(r.used or {}))
    try:
        factory = make_factory(sources[0].pins, sources[0].sensors, args.simulate)
    except HardwareError as exc:  # no GPIO: the exit code every command gives for it (systemd logs it)
        log.error("safe_state_failed", error=str(exc))
        return EXIT_HARDWARE
    claimed = [_claim_safe(entry, factory) for entry in entries]  # every one, also after one that failed
    return 0 if all(claimed) else 1


class _Read(NamedTuple):
    """A config as safe-state could read it: `settings` (None: nothing of it), why it is not valid, what was used."""

    settings: Settings | None
    invalid: config.ConfigError | None = None
    used: dict[str, Any] | None = None


def _known_good(directory: Path | None) -> _Read | None:
    if directory is None:
        return None
    problem = known_good.unusable(directory, make=False)
    if problem:  # said, as `run` refuses it; the pins are made safe all the same, from what can be read
        log.warning("state_dir_unusable", state_dir=str(directory), problem=problem)
    if not known_good.copy_path(directory).is_file():
        return None
    return _read(known_good.copy_path(directory), "the config the daemon last ran with")


def _read(path: Path, what: str) -> _Read:
    """All of a valid config (said: the source, its actuators); of an invalid one, what converts on its own,
    for the caller to say in one line with why it is invalid."""
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        try:
            salvaged, errors = config.salvage(path)
        except config.ConfigError:  # not readable at all
            return _Read(None, exc, {"source": what, "actuators": []})
        return _Read(salvaged, exc, {"source": f"{what}, salvaged", "actuators": [a.id for a in salvaged.actuators],
                                     "skipped": [str(error) for error in errors]})
    log.info("safe_state_source", file=str(path), source=what, actuators=[a.id for a in settings.actuators])
    return _Read(settings)


def _by_pin(sources: list[Settings]) -> list[ActuatorSettings]:
    """Each source's actuators on pins no earlier source names."""
    claimed: set[int] = set()
    entries = []
    for settings in sources:
        for entry in settings.actuators:
            if not claimed & set(entry.pins().values()):
                claimed.update(entry.pins().values())
                entries.append(entry)
    return entries


def _claim_safe(entry: ActuatorSettings, factory: Any) -> bool:
    from pi_controller.devices import actuators
    from pi_controller.devices.pins import hold

    try:
        actuator = actuators.build(entry, factory, state="safe")
    except Exception as exc:  # a busy or broken pin must not keep the others from their safe state
        log.error("safe_state_failed", device=entry.id, pins=entry.pins(), error=f"{type(exc).__name__}: {exc}")
        return False
    hold([actuator.device])
    log.info("safe_state_set", device=entry.id, pins=entry.pins(), target=actuator.target)  # what to check with a meter
    return True
