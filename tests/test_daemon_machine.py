"""The safety invariants (docs/safety.md, tests/invariants.py) over any sequence of events: the state
machine of tests/daemon_machine.py on the real daemon, on a bounded budget (benchmarks/fuzz.py --stateful
runs it long); and every sequence it has found, kept as a plain test of its own, shrunk to its steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from hypothesis.stateful import run_state_machine_as_test

from tests.daemon_machine import FIRST_CONFIG, IN_SUITE, NO_SUCH_DEVICE, DaemonMachine, Entry, Files, Manifest


def test_no_sequence_of_events_breaks_a_safety_invariant() -> None:
    run_state_machine_as_test(DaemonMachine, settings=IN_SUITE)


@contextlib.contextmanager
def machine() -> Iterator[DaemonMachine]:
    """The machine started as each sequence starts; every invariant judged after the sequence's last
    step, and at the stop."""
    state = DaemonMachine()
    try:
        state.start()
        yield state
        state.configured_plugins_run()
    finally:
        state.teardown()


def test_a_plugin_that_loses_the_grant_of_its_actuator_loses_the_actuator() -> None:
    with machine() as state:
        state.advance(ticks=15)  # the thermostat has switched the heater on
        state.regrant(name="thermostat", actuators=("lamp",))
        state.advance(ticks=15)


def test_a_dropped_in_plugin_never_keeps_a_configured_one_out_at_the_next_start() -> None:
    with machine() as state:
        state.drop(name="hog", files=Files("switchboard", Manifest(priority=999, timeout_ms=50,
                                                                   config={"mode": "trap"})))
        state.restart()


def test_a_dropped_in_plugin_never_keeps_a_configured_one_out_on_a_reload() -> None:
    with machine() as state:
        state.drop(name="hog", files=Files("switchboard", Manifest(priority=999, timeout_ms=50,
                                                                   config={"mode": "trap"})))
        state.reload(choice=FIRST_CONFIG)


def test_a_setting_off_its_plugin_s_schema_is_refused_by_check_config_and_the_reload_alike() -> None:
    with machine() as state:
        state.reconfigure(name="thermostat", entry=Entry(config={"mode": "hot"}))


@pytest.mark.parametrize("files", [
    Files("switchboard", Manifest(timeout_ms=50)),  # does not fit the plugin budget beside the two configured
    Files("switchboard", Manifest(actuators=(NO_SUCH_DEVICE,))),
    Files("switchboard", Manifest(name="someone_else")),
], ids=["over the budget", "no such actuator", "another plugin's name"])
def test_what_plugin_install_accepts_the_daemon_loads(files: Files) -> None:
    with machine() as state:
        state.install(name="stray", files=files)


def test_the_plugins_folder_deleted_and_recreated_is_loaded_again() -> None:
    with machine() as state:
        state.delete_folder()
        state.recreate_folder()


def test_ready_says_no_while_a_plugin_named_in_the_config_is_missing() -> None:
    with machine() as state:
        state.remove(name="lamp_ctl")


def test_a_recording_that_cannot_be_written_never_stops_the_daemon_from_starting() -> None:
    with machine() as state:
        state.record(unwritable=True)
        state.restart()


def test_an_override_that_ends_with_no_plugin_in_charge_leaves_the_actuator_safe() -> None:
    with machine() as state:
        state.operator_enables(name="thermostat", enabled=False)
        state.override(device="heater", payload=b'{"action": "set_high", "parameters": {}, "expires_s": 2}')
        state.advance(ticks=40)


def test_a_reload_check_config_accepts_goes_ahead_though_a_dropped_in_plugin_no_longer_fits() -> None:
    """Found on main after issue 25's fixes: check-config accepted the config (the dropped-in plugin would not
    load under it, it said), and the reload was refused for that plugin."""
    with machine() as state:
        state.drop(name="stray", files=Files("switchboard", Manifest(timeout_ms=40)))
        state.reconfigure(name="thermostat",
                          entry=Entry({"mode": "on", "device": "heater"}, priority=10, timeout_ms=20))


def test_an_owner_quarantined_for_its_rejected_commands_is_failing_since_the_first_rejection() -> None:
    """Found on main after issue 25's fixes: the quarantine that the rejections brought on started the
    owner's failing over, and the lamp stayed on its old duty 1 s longer."""
    with machine() as state:
        state.operator_sets(name="lamp_ctl", setting=("duty", 100))  # above the lamp's max_duty: each rejected
        state.advance(ticks=15)


def test_a_reload_keeps_a_running_version_whose_replacement_would_not_load() -> None:
    """Found on main after issue 25's fixes: the thermostat's file replaced by one that is no module (the
    running version kept, as the docs say), then any reload applied without the thermostat."""
    with machine() as state:
        state.drop(name="thermostat", files=Files("broken", None))
        state.reconfigure(name="lamp_ctl", entry=None)


def test_a_held_request_for_the_safe_state_stands_when_its_owner_is_gone() -> None:
    """Found by the long run with issue 32's fixes: the thermostat asked the heater off inside its min_on_s,
    and its folder was deleted before the hold ended; the heater went off when it ended, on the
    thermostat's behalf. docs/safety.md promises that (a held request for the safe state always stands),
    and going off then is sooner than failsafe_after_s: the owner invariant had no word for it."""
    with machine() as state:
        state.advance(ticks=17)  # the heater came on at 1.0 s (min_off_s from start-up); min_on_s holds to 2.0 s
        state.operator_sets(name="thermostat", setting=("mode", "off"))
        state.delete_folder()
        state.recreate_folder()


def test_plugin_install_refuses_while_a_plugin_the_config_names_would_not_load() -> None:
    """Found by the long run with issue 32's fixes: lamp_ctl's replacement refused (its manifest names
    another plugin: the running version stays, and holds its share), the thermostat greedy; a plugin
    installed that fitted only without lamp_ctl's share was accepted, then refused by the daemon."""
    with machine() as state:
        state.drop(name="lamp_ctl", files=Files("switchboard", Manifest(name="someone_else")))
        state.drop_greedy(name="thermostat", mode="trap")
        state.install(name="hog", files=Files("switchboard", None))


def test_a_plugin_given_a_smaller_share_makes_room_for_one_waiting() -> None:
    """Found by the long run with issue 32's fixes: lamp_ctl (20 ms) unloaded for the thermostat's new
    manifest (priority 5000, 50 ms) stayed out when the thermostat came down to 20 ms, room for both."""
    with machine() as state:
        state.reprioritize(name="lamp_ctl", priority=None, timeout_ms=20)
        state.rewrite_manifest(name="thermostat", manifest=Manifest(priority=5000, timeout_ms=50))
        state.reprioritize(name="thermostat", priority=None, timeout_ms=20)


def test_a_manifest_put_back_to_the_running_terms_ends_the_refusal_of_its_replacement() -> None:
    """Found by `fuzz.py --stateful` (seed 7005): the thermostat's manifest asked for 50 ms, no room beside
    lamp_ctl's 20 (refused, its 20 ms version kept), then for 20 ms again, the running version's terms. The
    refusal stayed in its status and in the wait for room; when lamp_ctl later made room, the watcher found the
    thermostat fitting and reloaded it as the same, between every two ticks for good."""
    with machine() as state:
        state.reprioritize(name="thermostat", priority=None, timeout_ms=20)
        state.reprioritize(name="lamp_ctl", priority=999, timeout_ms=20)
        state.reprioritize(name="thermostat", priority=None, timeout_ms=50)
        assert "its replacement was refused" in (state.rig.daemon.plugins.status["thermostat"].reason or "")
        state.reprioritize(name="thermostat", priority=None, timeout_ms=20)
        assert state.rig.daemon.plugins.status["thermostat"].reason is None
        state.reprioritize(name="lamp_ctl", priority=None, timeout_ms=None)  # the rig fails if the gap never empties
        assert not state.rig.gap_pending()


def test_an_owner_back_after_an_unload_with_every_command_rejected_has_been_failing_since_the_unload() -> None:
    """Found by `fuzz.py --stateful` (seed 10009): lamp_ctl's folder deleted (unloaded) and put back, and its
    duty set to 100, above the lamp's max_duty 80: every command rejected. No word of lamp_ctl's had reached
    the lamp since before the unload, yet the failsafe counted from the first rejection, and the lamp ran on
    that old word 1.1 s after its owner became unfit (failsafe_after_s 1)."""
    with machine() as state:
        state.delete_folder()
        state.sensor(state="20.0")
        state.recreate_folder()
        state.operator_sets(name="lamp_ctl", setting=("duty", 100))
        state.quarantine(name="thermostat")  # ticks for the failsafe to be due


def test_plugin_install_counts_the_share_of_the_tick_a_version_the_daemon_kept_holds() -> None:
    """Found by `fuzz.py --stateful` (seed 14003): the thermostat, no longer named in the config, was running
    at 10 ms when a 50 ms version of it was dropped in beside the 50 ms hog: refused for room, its 10 ms
    version kept. `plugin install` of a 10 ms plugin then checked the files (hog 50, thermostat refused: room
    for 10) and accepted it, and the daemon, whose 60 ms were held by hog and the kept thermostat, refused it.
    The install now refuses while a plugin of the folder would not load, as for one named in the config."""
    with machine() as state:
        state.drop_greedy(mode="trap", name="hog")
        state.reprioritize(name="thermostat", priority=1, timeout_ms=None)
        state.reconfigure(entry=None, name="thermostat")
        state.reconfigure(entry=None, name="lamp_ctl")
        state.drop_greedy(mode="trap", name="thermostat")
        state.remove(name="lamp_ctl")
        state.install(files=Files(module="switchboard", manifest=None), name="stray")
        assert "stray" not in state.rig.daemon.plugins.status


def test_a_configured_plugin_dropped_in_while_a_reload_waits_for_the_gap_is_loaded() -> None:
    """The reload was prepared from the folder without lamp_ctl; lamp_ctl's files land before its gap. The
    watcher's swap, prepared on the set the reload replaces, must not be dropped as if the reload had read them."""
    with machine() as state:
        state.remove(name="lamp_ctl")
        state.reconfigure_while_files_change(name="thermostat", entry=Entry({"mode": "on", "device": "heater"},
                                                                            priority=5),
                                             other="lamp_ctl",
                                             files=Files("switchboard", Manifest(actuators=("lamp",))))


def test_a_shadow_never_runs_in_the_share_of_a_live_plugin_dropped_in_after_it() -> None:
    with machine() as state:
        state.drop_shadow(name="thermostat", timeout_ms=20)
        state.drop(name="stray", files=Files("switchboard", Manifest(timeout_ms=40)))


def test_a_faster_loop_after_a_restart_leaves_the_live_plugins_their_share_beside_a_shadow() -> None:
    """The loop goes from 10 to 20 Hz (the config reloaded, which keeps the running rate, then a restart): the
    plugin budget from 60 to 30 ms, under the two configured plugins (10 ms each) and a shadow asking 20 ms beside
    them. The shadows get what the live plugins leave."""
    with machine() as state:
        state.drop_shadow(name="thermostat", timeout_ms=20)
        state.advance(ticks=3)
        assert state.rig.daemon is not None and len(state.rig.daemon.shadows.current) == 1
        state.change_rate(rate_hz=20.0, restart=False)
        state.configured_plugins_run()
        assert state.rig.daemon is not None and len(state.rig.daemon.shadows.current) == 1  # at 10 Hz still
        state.change_rate(rate_hz=20.0, restart=True)
        state.configured_plugins_run()
        assert state.rig.daemon is not None and len(state.rig.daemon.shadows.current) == 0
        state.advance(ticks=3)
        state.change_rate(rate_hz=10.0, restart=True)


def test_a_reload_of_a_faster_loop_whose_plugins_would_not_fit_it_is_refused_as_check_config_refuses_it() -> None:
    """Found by the machine's loop-rate rule: the thermostat asks 50 ms beside lamp_ctl's 10 of the 60 ms budget at
    10 Hz; the file then asks for 15 Hz (40 ms). check-config refuses it, as the next start would; the reload,
    which keeps the running rate until a restart, applied it (and kept it as the known-good config)."""
    with machine() as state:
        state.drop_greedy(mode="on", name="thermostat")
        state.change_rate(rate_hz=15.0, restart=False)


def test_the_operators_switch_taken_up_while_a_reload_waits_for_its_gap_stands_after_it() -> None:
    with machine() as state:
        state.operator_switches_during_reload(name="lamp_ctl", entry=None, other="thermostat", enabled=False)
        state.advance(ticks=15)
        state.operator_switches_during_reload(name="hog", entry=Entry(), other="thermostat", enabled=True)


def test_a_share_of_the_tick_taken_by_files_landing_during_a_reload_is_no_loss_of_the_reload() -> None:
    """Found by fuzz.py --stateful --seed 5203 (the model's error, not the daemon's): the thermostat holds 50 ms at
    priority 10; lamp_ctl, named in the config at priority 50 and 20 ms, has no files. They land while a reload
    waits for its gap, and the watcher loads lamp_ctl behind the reload, in the thermostat's share, by rank. The
    reload lost nothing: the machine judged that unload as the reload's."""
    with machine() as state:
        state.remove(name="lamp_ctl")
        state.drop_greedy(mode="trap", name="thermostat")
        state.reconfigure(entry=Entry(priority=50, timeout_ms=20), name="lamp_ctl")
        state.reconfigure(entry=Entry(), name="hog")
        state.reconfigure_while_files_change(entry=None, files=Files("switchboard", None), name="hog",
                                             other="lamp_ctl")


def test_a_reload_to_a_slower_loop_checks_the_configured_timeouts_against_the_running_one() -> None:
    """Found by the machine's budget_edge rule (fuzz.py --stateful --seed 31004): running at 15 Hz (40 ms), the
    thermostat's files removed; a config for 10 Hz whose two plugins ask 20 and 21 ms. check-config refuses it at the
    running rate (the timeouts the config sets add up past 40 ms), as the next start's budget check would there; the
    reload applied it, checking the plugins present (lamp_ctl's 21 ms) but not the config's own sum at that rate."""
    with machine() as state:
        state.change_rate(rate_hz=15.0, restart=True)
        state.remove(name="thermostat")
        state.budget_edge(over=True, rate_hz=10.0, restart=False)
        assert state.rig.daemon is not None
        assert state.rig.daemon.status.last_reload.outcome == "refused"


def test_timeouts_that_add_up_to_the_plugin_budget_exactly_fit_it_at_any_loop_rate() -> None:
    """Found by the machine's budget_edge rule at 12 Hz: 0.6 of a tick is 50 ms, which the product of the period and
    the share made 49.99999999999999: 25 + 25 ms refused by check-config and the reload alike, 2 ms less accepted."""
    with machine() as state:
        state.budget_edge(over=False, rate_hz=12.0, restart=True)
        assert state.in_force.rate_hz == 12.0


def test_a_manifest_narrowed_for_an_owner_already_unloaded_ends_no_grant() -> None:
    """Found by fuzz.py --stateful --seed 33002 (the model's error, not the daemon's): hog drove the heater and was
    unloaded for the configured plugins' shares; its manifest was then narrowed, and the machine asked the heater safe
    at once, as for a live owner's grant. An unloaded owner's actuator goes safe failsafe_after_s after its last call
    (docs/safety.md, judged by FAILSAFE); no grant of a running plugin changed."""
    with machine() as state:
        state.operator_enables(name="thermostat", enabled=False)
        state.crowd(mode="on", priority=1, timeout_ms=20)
        state.advance(ticks=15)
        assert ("heater", "hog") in state._owned()
        state.reconfigure(name="lamp_ctl", entry=Entry({"mode": "on", "device": "lamp", "duty": 30}, timeout_ms=40))
        assert state.rig.daemon is not None and "hog" not in {p.name for p in state.rig.daemon.plugins}
        state.narrow_grant_while_owning(pick=0, keep=())
        state.advance(ticks=15)
