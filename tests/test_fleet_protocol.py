"""What a fleet rollout says on the broker: every payload bounded and checked before use, and the stages a
fleet.yaml makes. The rollouts themselves, against real daemons and a broker, are in test_fleet.py."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import asdict, replace
from typing import Any

import pytest

from pi_controller import cli, config
from pi_controller.fleet import protocol
from pi_controller.fleet.protocol import MAX_VERDICT_BYTES, Announcement, Malformed, Verdict
from pi_controller.fleet.tool import MAX_MODULE_BYTES, Plan, announce, load_plan
from pi_controller.plugins.refusal import Refused

GOOD = Announcement("1796633878-819e5030", "probe", "2.0.0", "a" * 64, 96097, 2, "sig", None,
                    (("node-00",), ("node-01", "node-02")), 0)


def payload(**changes: Any) -> bytes:
    data = asdict(GOOD) | changes
    return json.dumps(data).encode()


def test_an_announcement_round_trips() -> None:
    assert Announcement.parse(GOOD.payload(), 1 << 20) == GOOD
    assert GOOD.stage_of("node-02") == 1 and GOOD.stage_of("node-09") is None


@pytest.mark.parametrize("changes, says", [
    ({"size": 2 << 20, "chunks": 32}, "this node takes 1 to 1048576"),
    ({"chunks": 3}, "3 chunks for 96097 bytes"),
    ({"stages": [["node-00"], ["node-00"]]}, "name each node"),
    ({"stages": [["node/00"]]}, "name each node"),
    ({"stages": []}, "name each node"),
    ({"stage": 2}, "one of its stages"),
    ({"state": "paused"}, "one of its stages"),
    ({"sha256": "A" * 64}, "a sha256"),
    ({"name": "../probe"}, "names a plugin"),
    ({"signature": "x" * 2000}, "longer than a node takes"),
    ({"shadow_ticks": 1.5}, "whole numbers"),
    ({"min_agreement_percent": 101}, "0 to 100 percent"),
    ({"rollout": "a b"}, "are text"),
    ({"extra": 1}, "not an announcement"),
])
def test_an_announcement_a_node_cannot_use_is_refused_saying_why(changes, says) -> None:
    with pytest.raises(Malformed, match=says):
        Announcement.parse(payload(**changes), 1 << 20)


def test_a_module_is_published_in_whole_chunks_the_last_one_shorter() -> None:
    sizes = (1, protocol.CHUNK_BYTES - 1, protocol.CHUNK_BYTES, protocol.CHUNK_BYTES + 1, 3 * protocol.CHUNK_BYTES)
    assert [protocol.chunk_count(size) for size in sizes] == [1, 1, 1, 2, 3]


def test_payloads_over_their_bound_are_refused_before_they_are_decoded() -> None:
    with pytest.raises(Malformed, match="over the"):
        Announcement.parse(b"{" + b" " * protocol.MAX_ANNOUNCEMENT_BYTES + b"}", 1 << 20)
    with pytest.raises(Malformed, match="over the 4096 bytes"):
        Verdict.parse(b" " * 5000)
    with pytest.raises(Malformed, match="phase"):
        Verdict.parse(b'{"rollout": "r", "phase": "promoted"}')
    assert Verdict.parse(Verdict("r", "live", "2.0.0").payload()) == Verdict("r", "live", "2.0.0")


@pytest.mark.parametrize("stages, expected", [
    (("100%",), [["a"], ["b", "c", "d", "e"]]),
    (("1", "50%"), [["a"], ["b"], ["c", "d"], ["e"]]),
    (("2",), [["a"], ["b", "c"], ["d", "e"]]),  # any left: a last stage
])
def test_the_stages_are_the_canaries_then_counts_or_percentages_of_the_rest(stages, expected) -> None:
    plan = Plan(("a", "b", "c", "d", "e"), stages=stages)
    assert [list(s) for s in plan.staged()] == expected
    assert list(replace(plan, canaries=("c",)).staged()[0]) == ["c"]


def test_a_fleet_yaml_with_a_bad_stage_names_file_line_and_key(tmp_path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("nodes: [a, b]\nstages: ['1', 'half']\n")
    with pytest.raises(config.ConfigError, match="stages"):
        load_plan(path)
    path.write_text("nodes: [a, b]\ncanaries: [c]\n")
    with pytest.raises(config.ConfigError, match="nodes"):
        load_plan(path)
    path.write_text("nodes: [a, b]\nstages: ['50%']\nbroker: {host: hub, port: 1884}\n")
    assert load_plan(path).broker.port == 1884


def test_the_tool_follows_a_link_to_a_module_built_elsewhere(tmp_path) -> None:
    """On the owner's workstation there is no plugins folder to stay within: a link from where the rollout is
    made to where the module was built is read (and here refused for what it lacks: a signature)."""
    built, out = tmp_path / "build", tmp_path / "out"
    built.mkdir()
    out.mkdir()
    (built / "probe.wasm").write_bytes(b"\0asm\x01\0\0\0")
    (out / "probe.wasm").symlink_to(built / "probe.wasm")
    with pytest.raises(ValueError, match=r"probe.wasm: not signed"):
        announce(out / "probe.wasm", Plan(("node-00",)))


def test_the_tool_refuses_a_module_over_its_limit_by_its_size_before_reading_it(tmp_path, capsys) -> None:
    wasm = tmp_path / "probe.wasm"
    with wasm.open("wb") as file:
        file.truncate(MAX_MODULE_BYTES + 1)  # sparse: its size says it all
    tracemalloc.start()
    try:
        with pytest.raises(Refused, match=f"has {MAX_MODULE_BYTES + 1} bytes"):
            announce(wasm, Plan(("node-00",)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_MODULE_BYTES // 16  # not read: reading it took the whole 16 MiB
    fleet_yaml = tmp_path / "fleet.yaml"
    fleet_yaml.write_text("nodes: [node-00]\n")
    assert cli.main(["fleet", "rollout", str(wasm), "--config", str(fleet_yaml)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {wasm} has {MAX_MODULE_BYTES + 1} bytes, over the fleet tool's limit {MAX_MODULE_BYTES}"]


NOT_A_MODULE = "is not a WebAssembly binary module (no \\0asm magic; the text format is not accepted: build the .wasm)"


@pytest.mark.parametrize(("given", "said"), [
    ("text.wasm", f"text.wasm {NOT_A_MODULE}"),
    ("{tmp}/text.wasm", f"{{tmp}}/text.wasm {NOT_A_MODULE}"),
    ("missing.wasm", "missing.wasm: no such plugin file (a .wasm)"),
])
def test_the_tool_names_a_module_it_refuses_once_as_given_in_one_line(tmp_path, monkeypatch, capsys, given: str,
                                                                       said: str) -> None:
    """The file gate's refusal names the file as the owner typed it, once, and says why in the gate's words."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.wasm").write_text("(module)")
    (tmp_path / "fleet.yaml").write_text("nodes: [node-00]\n")
    assert cli.main(["fleet", "rollout", given.format(tmp=tmp_path), "--config", "fleet.yaml"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {said.format(tmp=tmp_path)}"]


@pytest.mark.parametrize("reason", ["\U0001f525" * 500, "\x01" * 500, "x" * 5000])
def test_a_verdict_with_any_reason_fits_what_a_verdict_may_weigh(reason: str) -> None:
    """A node's reason in any script (500 characters, as a node cuts it) reaches the fleet tool whole; one
    that would not fit (control characters, or longer than any node says) is cut rather than dropped."""
    verdict = Verdict("r", "rolled_back", "2.0.0", "ab" * 32, reason, {"calls": 10, "errors": 1})
    parsed = Verdict.parse(verdict.payload())
    assert len(verdict.payload()) <= MAX_VERDICT_BYTES
    assert parsed.reason == reason if len(reason) <= 500 else reason.startswith(parsed.reason or "-")


def test_a_verdict_with_a_lone_surrogate_or_a_version_past_the_bound_is_still_said() -> None:
    """A manifest's version may hold a lone surrogate (YAML takes one): it goes as its \\u escape, not as an
    encoding error that would stop the node's telemetry; a version that alone passes the bound is cut."""
    odd = Verdict("r", "refused", "1.0\udcff", None, "replaced by version 1.0\udcff by hand")
    assert Verdict.parse(odd.payload()) == odd
    huge = Verdict.parse(Verdict("r", "live", "9" * 10_000, None, "x" * 500).payload())
    assert huge.reason == "" and "9" * 1000 in (huge.version or "") and len(huge.version or "") < 4096
