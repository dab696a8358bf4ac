"""A real Home Assistant for the tests: installed once per release into a venv of its own, under the
machine's cache, and driven through its own HTTP API as a user's browser drives it.

The install takes what Home Assistant itself needs and nothing else, from binary wheels:
- the `homeassistant` wheel with `--no-deps`, then its own requirements under its own pins
  (`homeassistant/package_constraints.txt` in the wheel: without them pip backtracks for long);
- the requirements of the integrations a start sets up without `default_config:` (bootstrap's core and
  default integrations, and what they depend on), and of `mqtt`; Home Assistant runs with `--skip-pip`,
  so a missing one fails the start rather than installing at test time;
- `--only-binary :all:`, but for `FROM_SOURCE` (pins of Home Assistant's without a wheel for this Python
  on PyPI, each a few seconds to build), and with `NEWER_WHEELS` in place of Home Assistant's pins.

Why not `default_config:` and a plain `pip install homeassistant`: the wheel itself requires
pyspeex-noise 1.0.2 and pymicro-vad 1.0.1 (Assist's noise suppression and voice detection, mirrored from
the assist_pipeline integration), which PyPI has no CPython 3.13 wheel of (Home Assistant builds its own
wheels); pip built them from their C++ sources for more than ten minutes here. Onboarding imports them
(through cloud and assist_pipeline) but never runs them: their first releases with such a wheel do.
`default_config:` would add bluetooth, stream, go2rtc and more, each pip-installed at the first start.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pi-controller-ha"
FROM_SOURCE = ("ciso8601", "lru-dict", "PyTurboJPEG", "fnvhash", "PyRIC", "paho-mqtt")  # small: C or pure Python
NEWER_WHEELS = {"pyspeex-noise": "2.0.1", "pymicro-vad": "2.1.0"}  # imported by onboarding, never run here
NEEDED = ("mqtt",)  # set up by the test's config flow, beside bootstrap's defaults
PINS_LACKING = ("josepy<2",)  # acme before 2024.5 needs josepy's ComparableX509, gone in josepy 2 (start fails)


@dataclass(frozen=True)
class Release:
    version: str
    python: str  # a pyenv version: Home Assistant after 2024.3 needs 3.12, after 2024.12 3.13

    @property
    def interpreter(self) -> Path:
        return PYENV / self.python / "bin" / "python3"


def install(release: Release) -> Path:
    """Home Assistant's venv for `release`, installed unless the cache holds it; its `bin/hass`. Keyed
    by the release, the interpreter and this recipe, so a change of either installs afresh. Two test
    workers: one installs, the other waits for it."""
    recipe = repr((FROM_SOURCE, sorted(NEWER_WHEELS.items()), NEEDED, PINS_LACKING))
    recipe = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    venv = CACHE / f"{release.version}-py{release.python}-{recipe}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            _install(release, venv)
            (venv / "installed").write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
            _prune(release, venv)
    return venv / "bin" / "hass"


def _prune(release: Release, kept: Path) -> None:
    """The installs of `release` by other recipes, some 800 MB each, with their locks and logs."""
    for other in CACHE.glob(f"{release.version}-py{release.python}-*"):
        if other.name.split(".")[0] != kept.name and other.resolve() != kept.resolve():
            if other.is_dir() and not other.is_symlink():
                shutil.rmtree(other, ignore_errors=True)
            else:
                other.unlink(missing_ok=True)


def _install(release: Release, venv: Path) -> None:
    """Into `venv`; pip's output in `<venv>.log`, its end in the error if a step fails."""
    log = Path(f"{venv}.log")
    with open(log, "w") as out, tempfile.TemporaryDirectory() as scratch:
        def run(*command: str | Path) -> None:
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                out.flush()
                raise RuntimeError(f"installing Home Assistant {release.version} failed (see {log}): "
                                   f"{log.read_text()[-2000:]}")

        run(release.interpreter, "-m", "venv", venv)
        pip = (venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check")
        folder = Path(scratch)
        run(*pip, "download", "--no-deps", f"homeassistant=={release.version}", "-d", folder)
        (wheel,) = folder.glob("homeassistant-*.whl")
        requirements, constraints = needs(zipfile.ZipFile(wheel))
        (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
        (folder / "constraints.txt").write_text("\n".join(constraints) + "\n")
        run(*pip, "install", "--only-binary", ":all:", "--no-binary", ",".join(FROM_SOURCE),
            "-c", folder / "constraints.txt", "-r", folder / "requirements.txt")
        run(*pip, "install", "--no-deps", wheel)


def needs(wheel: zipfile.ZipFile) -> tuple[list[str], list[str]]:
    """(requirements, constraints) of the Home Assistant `wheel`, with `NEWER_WHEELS` for its pins."""
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    own = [line.removeprefix("Requires-Dist: ") for line in wheel.read(metadata).decode().splitlines()
           if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    pins = [line for line in wheel.read("homeassistant/package_constraints.txt").decode().splitlines()
            if line.strip() and not line.startswith("#")]
    wanted = own + integration_requirements(wheel)
    requirements = [r for r in wanted if _name(r) not in NEWER_WHEELS]
    requirements += [f"{name}=={version}" for name, version in NEWER_WHEELS.items()
                     if name in map(_name, wanted)]
    return requirements, [pin for pin in pins if _name(pin) not in NEWER_WHEELS] + list(PINS_LACKING)


def integration_requirements(wheel: zipfile.ZipFile) -> list[str]:
    """What the integrations a start sets up (bootstrap's core and default ones, `NEEDED`, and what those
    depend on) require."""
    bootstrap = ast.parse(wheel.read("homeassistant/bootstrap.py"))
    todo: set[str] = set(NEEDED)
    for node in bootstrap.body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("CORE_INTEGRATIONS", "DEFAULT_INTEGRATIONS")):
            todo |= set(ast.literal_eval(node.value))
    seen: set[str] = set()
    requirements: list[str] = []
    while todo:
        domain = todo.pop()
        seen.add(domain)
        try:
            manifest = json.loads(wheel.read(f"homeassistant/components/{domain}/manifest.json"))
        except KeyError:
            continue
        requirements += manifest.get("requirements", [])
        todo |= set(manifest.get("dependencies", [])) - seen
    return requirements


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


class HomeAssistant:
    """A running Home Assistant on `folder`, onboarded through its API, with the MQTT integration set up by
    its config flow on `broker_port`: what a user does in the browser."""

    def __init__(self, hass: Path, folder: Path, port: int, broker_port: int):
        self.folder, self.base = folder, f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "configuration.yaml").write_text(f"http: {{server_host: 127.0.0.1, server_port: {port}}}\n")
        self.process = subprocess.Popen([hass, "-c", folder, "--skip-pip"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.token = ""
        self.broker_port = broker_port

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Home Assistant exited with {self.process.returncode}: {self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.base}/api/onboarding", timeout=5) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def onboard(self) -> None:
        """The owner's account, a token for it, analytics (off), then MQTT's config flow: onboarding as a
        browser does it, but for the home's location (`core_config`), which sets up a new install's
        weather, radio and text-to-speech integrations: each needs the internet and packages of its own
        (2024.4 answers 500 without them)."""
        client_id = f"{self.base}/"
        code = self.call("POST", "/api/onboarding/users", {"client_id": client_id, "name": "Owner",
                                                           "username": "owner", "password": "a-test-password",
                                                           "language": "en"})["auth_code"]
        form = urllib.parse.urlencode({"grant_type": "authorization_code", "code": code, "client_id": client_id})
        with urllib.request.urlopen(f"{self.base}/auth/token", form.encode(), timeout=30) as answer:
            self.token = json.load(answer)["access_token"]
        self.call("POST", "/api/onboarding/analytics", {})
        step = self.call("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        for _ in range(3):  # the broker step (a form), until the entry is made
            if step["type"] == "create_entry":
                return
            step = self.call("POST", f"/api/config/config_entries/flow/{step['flow_id']}",
                             {"broker": "127.0.0.1", "port": self.broker_port})
        raise AssertionError(f"MQTT's config flow did not end in an entry: {step}")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.base}{path}", None if body is None else json.dumps(body).encode(),
                                         headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None

    def states(self) -> dict[str, dict[str, Any]]:
        return {state["entity_id"]: state for state in self.call("GET", "/api/states")}

    def service(self, domain: str, service: str, **data: Any) -> None:
        self.call("POST", f"/api/services/{domain}/{service}", data)

    def log(self) -> str:
        path = self.folder / "home-assistant.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def complaints(self, about: str) -> list[str]:
        """Log entries at warning or above (a line, and the traceback after it) in which `about` (a regular
        expression) is found."""
        entries = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", self.log())
        return [entry for entry in entries if re.match(r"\S+ \S+ (WARNING|ERROR|CRITICAL) ", entry)
                and re.search(about, entry)]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
