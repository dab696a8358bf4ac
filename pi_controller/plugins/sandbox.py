"""A sandboxed control plugin: one Extism instance under its grant.

This module knows nothing of pins or MQTT: it turns a context into raw output bytes, or an error that
says why, within the plugin's grant (memory, fuel, time, output, vars, hosts; see `manifest`). Each
instance is called from one thread only (the tick thread): the SDK returns another call's output when
an instance is shared. The plugins of a folder make up a `plugin_set.PluginSet`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import extism

from pi_controller import logs
from pi_controller.contract import Command, CommandTarget, Context, Rejection, encode_config, parse_output
from pi_controller.plugins.backstop import Backstop
from pi_controller.plugins.extism_adapter import Module, call, calls_host, compile_module, handle, may_log
from pi_controller.plugins.extism_log import router
from pi_controller.plugins.host_functions import FUNCTIONS, PluginHost
from pi_controller.plugins.manifest import Grant, Refused
from pi_controller.plugins.quarantine import Quarantine
from pi_controller.plugins.wasm_gate import trial
from pi_controller.plugins.wasm_imports import imported_functions

ENTRY_POINT = "control_logic"
_ENTRY_POINT = ENTRY_POINT.encode()  # as libextism takes it, encoded once
HEALTH_CHECK = "health_check"  # optional export: called once at load; an error refuses the plugin

# Failures after which the instance is rebuilt: Extism keeps an instance whose call trapped or was
# stopped, and a guest without our PDK's stack reset would keep the leaked stack (and an instance
# that hit its memory limit would keep all that memory) on every later call. The plugin's vars go
# with it: the error says so (`reset`), and the loop counts it.
_REBUILD_AFTER = frozenset({"trap", "stalled", "out_of_memory", "out_of_fuel", "host_call_limit"})


class PluginCallError(Exception):
    """A call that produced no usable output; `kind` is "out_of_fuel", "out_of_memory", "trap",
    "host_call_limit", "output_too_large", "error_return" (the plugin reported an error of its own),
    or "stalled" (it ran past its wall-clock backstop: the machine's doing, not the plugin's; see
    `backstop`). `reset`: its instance was rebuilt, so its vars start empty again."""

    def __init__(self, kind: str, message: str, reset: bool = False):
        super().__init__(message)
        self.kind = kind
        self.reset = reset

    @staticmethod
    def kind_of(exc: Exception) -> str:
        """What a failed decision is counted and logged by: the call's kind, or what else was raised."""
        kind = getattr(exc, "kind", None)  # a PluginCallError's, or the contract's OutputError's
        return kind if isinstance(kind, str) else type(exc).__name__

    @property
    def plugin_s_fault(self) -> bool:
        return self.kind != "stalled"

    @classmethod
    def stalled(cls, terms: Grant, backstop_ms: int) -> PluginCallError:
        return cls("stalled", f"stalled: the call ran past its {backstop_ms} ms wall-clock backstop, far "
                              f"beyond what fuel {terms.fuel} costs on this machine: the machine or a host "
                              "function was slow")

    @classmethod
    def from_extism(cls, exc: extism.Error, reason: str | None, terms: Grant, backstop_ms: int) -> PluginCallError:
        message = str(exc) or "error without a message"
        if message == "timeout":
            return cls.stalled(terms, backstop_ms)
        if message == "plugin ran out of fuel":
            return cls("out_of_fuel", f"ran out of fuel: more than {terms.fuel} instructions in one call")
        if message == "oom" or "failed to allocate" in message:
            return cls("out_of_memory", f"oom: memory would pass memory_pages {terms.memory_pages} "
                                        f"({terms.memory_pages * 64} KiB)")
        if message.startswith("error while executing"):
            return cls("trap", reason or message)
        return cls("error_return", message)


def compile_plugin(wasm: bytes, terms: Grant, host: Any, backstop_ms: int) -> Module:
    """A compiled module under `terms`, with a fuel limit (the SDK's constructor has none) and our
    host functions bound to `host` (a cffi handle of its PluginHost): WASI and files only as granted,
    no network beyond `allowed_hosts`. Tried first in a child process (`wasm_gate.trial`)."""
    manifest = {
        "memory": {"max_pages": terms.memory_pages, "max_var_bytes": terms.max_var_bytes,
                   "max_http_response_bytes": terms.max_http_response_bytes},
        "timeout_ms": backstop_ms,  # against a stall only: fuel is the budget (see `backstop`)
        "allowed_hosts": list(terms.allowed_hosts),
        # Extism config holds strings only: other values go as their JSON text.
        "config": {k: v if isinstance(v, str) else json.dumps(v) for k, v in terms.config.items()},
        **({"allowed_paths": dict(terms.allowed_paths)} if terms.allowed_paths else {}),
    }
    # The module spliced in as bytes: one copy of its base64 rather than three (str, JSON, bytes).
    data = b'{"wasm":[{"data":"' + base64.b64encode(wasm) + b'"}],' + json.dumps(manifest).encode()[1:]
    trial(data, terms.wasi, terms.fuel)
    return compile_module(data, terms.wasi, terms.fuel, host, FUNCTIONS)


def drain_log() -> None:
    """Log what libextism's own log holds now (lines no failed call took as its reason), so that its buffer
    never grows. Once per batch of calls, not after each: paced at 10 Hz with 3 plugins, a drain between
    two calls made the next call 8 to 13 us slower (libextism's log lock and buffer, cold each time). The loop
    drains only while a plugin that can log there is loaded, and every 64th tick (`loop.DRAIN_EVERY`)."""
    router().drain()


class SandboxedPlugin:
    """One loaded `.wasm` under its grant, with its quarantine."""

    def __init__(self, name: str, wasm: bytes, terms: Grant, quarantine: Quarantine, host: PluginHost,
                 backstop: Backstop | None = None):
        self.name = name
        self.grant = terms
        self.priority = terms.priority  # read for every parse: an attribute, as the grant never changes
        backstop = backstop or Backstop()
        self.backstop_ms = backstop.ms(terms.fuel, terms.timeout_ms)
        # On a virtual clock libextism's timer, which counts wall-clock time, cannot tell a stall: the host
        # functions check the loop's clock against the same backstop instead (`PluginHost.spend`).
        self._virtual_backstop_s = math.inf if backstop.real else self.backstop_ms / 1000
        self.quarantine = quarantine
        self.host = host
        self._host_handle = handle(host)  # what the host functions get: alive as long as we are
        self.sha256 = hashlib.sha256(wasm).hexdigest()
        if terms.sha256 is not None and terms.sha256 != self.sha256:
            raise Refused(f"sha256 {self.sha256} is not the pinned {terms.sha256}")
        self.set_config({})
        self.last_call_s: float = 0.0
        self.last_output: bytes | None = None  # of the last `decide`
        # The last output that parsed, the actuators it was parsed against and what came of it: a plugin
        # that says the same as last tick (most do, most ticks) costs no parse and no screen.
        self._screened: tuple[bytes, Mapping[str, CommandTarget], list[Command], list[Rejection]] | None = None
        self._module = compile_plugin(wasm, terms, self._host_handle, self.backstop_ms)
        # Read once the module has passed its trial and compiled (so its imports are within wasmtime's limits).
        imported = imported_functions(wasm)
        self.logs_to_extism = may_log(imported)  # so the tick drains libextism's log for it
        # Whether a call can reach our host functions, the only readers of the host's per-call budgets and
        # backstop: most plugins import none, and their calls skip setting them (a Python call per plugin per tick).
        self._calls_host = calls_host(imported)
        # Whether a call that succeeds can write to fd 2: libextism prints a guest's log line that holds a NUL,
        # and WASI's stderr when EXTISM_ENABLE_WASI_OUTPUT is set (a failed call can always: its error).
        self._may_write_fd2 = self.logs_to_extism or terms.wasi
        try:
            self._instance, self._id = self._instantiate()
        except extism.Error as exc:
            self._module.free()
            if "wasi_snapshot_preview1" in str(exc) and not terms.wasi:
                raise Refused(f"{exc} (the module needs WASI, which is not granted: wasi: true in its "
                              "manifest or settings, within plugins.ceilings.allow_wasi)") from exc
            raise
        try:
            self._check_exports()
        except BaseException:
            self.close()
            raise

    def _instantiate(self) -> tuple[extism.Plugin, str]:
        instance = self._module.instantiate()
        instance_id = str(instance.id)
        router().register(instance_id, self.name, self.host.budget)
        self.host.cancel = instance.cancel_handle().cancel
        return instance, instance_id

    def _check_exports(self) -> None:
        if not self._instance.function_exists(ENTRY_POINT):
            raise Refused(f"the module does not export '{ENTRY_POINT}'")
        if self._instance.function_exists(HEALTH_CHECK):
            try:
                with logs.held_native_stderr():
                    self._invoke(HEALTH_CHECK.encode(), b"", bounded=False)
            except PluginCallError as exc:
                raise Refused(f"{HEALTH_CHECK} failed: {exc}") from exc

    def set_config(self, overrides: Mapping[str, Any]) -> None:
        """The grant's config with an operator's values over it, encoded once for every later call."""
        self.config: dict[str, Any] = {**self.grant.config, **overrides}  # what the plugin runs with
        self.config_suffix = encode_config(self.config)

    def call(self, context: bytes, tick: int | None = None) -> bytes:
        """One tick: `context` is the context without its config (`contract.encode_context`). What
        libextism logged during the call is logged before it returns."""
        with logs.held_native_stderr():
            output = self._invoke(_ENTRY_POINT, context + self.config_suffix, tick)
        drain_log()
        return output

    def _invoke(self, function: bytes, data: bytes, tick: int | None = None, bounded: bool = True) -> bytes:
        """`function` on `data` under the host-call budget and the backstops, its output within
        max_output_bytes if `bounded`; libextism's log is left for `drain_log`. Called in a batch that holds
        fd 2 (`logs.held_native_stderr`): what libextism wrote there during a call that can have written is
        taken as this plugin's, before anything else the call leads to. One frame for all of it: it runs for
        every plugin every tick."""
        host = self.host
        if self._calls_host:
            host.start_call(tick, self._virtual_backstop_s)
        try:
            output = call(self._instance, function, data)
        except extism.Error as exc:
            self._take_native_stderr()  # libextism prints a guest's error that holds a NUL
            error = self._call_error(exc)
            if error.kind in _REBUILD_AFTER:
                self._rebuild()
                error.reset = True
            raise error from exc
        if self._may_write_fd2:
            self._take_native_stderr()
        if host.over_budget or host.stalled:  # it ended anyway (a cancel not taken yet): the verdict stands
            self._rebuild()
            error = self._call_error(extism.Error("cancelled"))
            error.reset = True
            raise error
        if bounded and len(output) > self.grant.max_output_bytes:
            raise PluginCallError("output_too_large", f"output of {len(output)} bytes exceeds max_output_bytes "
                                  f"{self.grant.max_output_bytes}")
        return output

    def _take_native_stderr(self) -> None:
        """What a call of a batch wrote to fd 2, as this plugin's."""
        native = logs.native_stderr
        if native is not None and (lines := native.take()):
            router().native_stderr(self._id, lines)

    def _call_error(self, exc: extism.Error) -> PluginCallError:
        reason = router().reason(self._id)
        if self.host.stalled:  # past its backstop before anything else: whatever it ended with is no verdict
            return PluginCallError.stalled(self.grant, self.backstop_ms)
        if self.host.over_budget:  # we cancelled it: what shows is a timeout or a trap
            return PluginCallError("host_call_limit", f"cancelled: more than {self.host.settings.host_calls_per_call} "
                                   "host function calls in one call (plugins.host.host_calls_per_call)")
        return PluginCallError.from_extism(exc, reason, self.grant, self.backstop_ms)

    def _rebuild(self) -> None:
        """A fresh instance of the same compiled module (~0.4 ms); its vars start empty again."""
        self._free_instance()
        self._instance, self._id = self._instantiate()

    def decide(self, context: Context, targets: Mapping[str, CommandTarget],
               timer: Callable[[], float] = time.perf_counter) -> tuple[list[Command], list[Rejection]]:
        """view, call, parse, screen: this plugin's commands for the tick, and those the contract or its
        grant refused. Raises PluginCallError or contract.OutputError when nothing usable came back;
        `last_call_s` and `last_output` (None if the call failed) say how the call went."""
        with logs.held_native_stderr():
            self.ask(context, timer)
        drain_log()
        return self.answer(targets)

    def ask(self, context: Context, timer: Callable[[], float] = time.perf_counter) -> None:
        """`decide`'s call, one of a batch (`logs.held_native_stderr`, which the loop holds around the tick's
        calls): `last_output` (None if it failed: PluginCallError) and `last_call_s`. What libextism logged
        during the call stays in its buffer until `drain_log`, which the loop calls after the tick's calls,
        not between two (see `drain_log`)."""
        self.last_output = None
        started = timer()
        try:
            mine = context.encoded if self.grant.sensors is None else self.view(context)  # no call for the whole
            self.last_output = self._invoke(_ENTRY_POINT, mine + self.config_suffix, context.tick)
        finally:
            self.last_call_s = timer() - started

    def answer(self, targets: Mapping[str, CommandTarget]) -> tuple[list[Command], list[Rejection]]:
        """`decide`'s parse and screen of what the last `ask` got back, or what they gave last time for the
        same output and actuators (a reload makes a new mapping of them). Commands are never changed once
        made: they are shared."""
        output, last = self.last_output, self._screened
        assert output is not None, "answer() follows an ask() that succeeded"
        if last is not None and last[1] is targets and last[0] == output:
            return list(last[2]), list(last[3])
        commands, rejections = parse_output(output, self.name, self.priority, targets)
        if self.grant.actuators is not None:
            commands, rejections = self.screen(commands, rejections, self.grant.actuators)
        self._screened = (output, targets, commands, rejections)
        return list(commands), list(rejections)

    def view(self, context: Context) -> bytes:
        """The context as this plugin may see it: only the readings of its declared sensors."""
        return context.encoded if self.grant.sensors is None else context.only(self.grant.sensors)

    def screen(self, commands: list[Command], rejections: list[Rejection], allowed: frozenset[str]
               ) -> tuple[list[Command], list[Rejection]]:
        """Valid commands split by capability: one to an actuator not `allowed` (the grant's) is rejected."""
        kept = [c for c in commands if c.device_id in allowed]
        refused = [Rejection(self.name, c.device_id, "forbidden_device",
                             f"'{c.device_id}' is not among the actuators granted to this plugin "
                             f"({', '.join(sorted(allowed)) or 'none'})")
                   for c in commands if c.device_id not in allowed]
        return kept, rejections + refused

    def status(self, refusal: PluginStatus | None = None) -> PluginStatus:
        """As loaded now; `refusal`: of a replacement refused, while this version is kept over it."""
        version, refused = self.grant.manifest.version or None, refusal.refused_sha256 if refusal else None
        if self.quarantine.shown_quarantined:
            return PluginStatus("quarantined", self.quarantine.reason, self.sha256, version, refused)
        reason = f"kept this version: its replacement was refused: {refusal.reason or 'unknown'}" if refusal else None
        return PluginStatus("loaded", reason, self.sha256, version, refused)

    def _free_instance(self) -> None:
        router().forget(self._id)
        self._instance.__exit__(None, None, None)

    def close(self) -> None:
        self._free_instance()
        self._module.free()


@dataclass(frozen=True)
class PluginStatus:
    state: str  # "loaded", "quarantined", "disabled" or "failed"
    reason: str | None = None
    sha256: str | None = None
    version: str | None = None
    refused_sha256: str | None = None  # the module refused or unloaded: in place of this version (kept), or alone
