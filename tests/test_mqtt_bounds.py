"""MQTT command payloads are bounded per topic before they are decoded, and never logged whole."""

from __future__ import annotations

from tests.test_mqtt import BASE, broker, daemon_config, finish, start_daemon, state, subscriber  # noqa: F401

HUGE = "7" * 1_048_576


def test_oversize_payloads_are_refused_before_decoding_and_logged_bounded(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/led_strip/state"))
        for topic, payload in [("plugin/temperature_control/config/setpoint/set", HUGE),
                               ("actuator/led_strip/set", '{"action": "pwm", "parameters": {"x": "' + HUGE + '"}}'),
                               ("plugin/temperature_control/enable", "ON" + " " * 100),
                               ("actuator/relay_switch/set", "ON")]:  # the last one comes through
            subscriber.publish(f"{BASE}/{topic}", payload)
        subscriber.wait_for(lambda: (s := state(subscriber, f"{BASE}/actuator/relay_switch/state")) and s["override"])
    finally:
        _, events = finish(process)
    rejected = [e["error"] for e in events if e["event"] == "mqtt_message_rejected"]
    assert rejected == ["a payload of 1048576 bytes, over the 16384 bytes this topic takes",
                        "a payload of 1048618 bytes, over the 1024 bytes this topic takes",
                        "a payload of 102 bytes, over the 16 bytes this topic takes"]
    assert not any(e["event"] in ("plugin_config_set", "operator_command_rejected") for e in events)
    assert max(len(str(value)) for e in events for value in e.values()) < 400
