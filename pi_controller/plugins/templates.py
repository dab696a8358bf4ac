"""What `pi-controller plugin new` writes: a plugin source (Zig, C or AssemblyScript), its manifest, a sample
context for `plugin call` and a scenario for `simulate`, all for the same small job.

The job: a light that goes on in the dark and off in bright light, with a gap between the two thresholds
wider than what the light adds to its own sensor (`lamp_lux` in the scenario), so it cannot switch itself
back and forth. Every file is formatted with `name`.
"""

from __future__ import annotations

SOURCES: dict[str, str] = {
    "zig": '''//! {name}: a light on in the dark, off in bright light. Built by `pi-controller plugin build {name}.zig`.

const pdk = @import("pdk");

/// Whether the light is on: kept from tick to tick, so between dark_lux and bright_lux nothing changes.
var on = false;

export fn control_logic() i32 {{
    return pdk.run(step);
}}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {{
    const light = try ctx.configString("light", "led_strip");
    const lux = ctx.value("light_sensor") orelse return; // invalid or missing: no command
    if (lux > try ctx.configNumber("bright_lux", 500)) on = false;
    if (lux < try ctx.configNumber("dark_lux", 300)) on = true;
    if (on) try out.setHigh(light) else try out.setLow(light);
}}
''',
    "c": '''/* {name}: a light on in the dark, off in bright light. Built by `pi-controller plugin build {name}.c`. */

#include "pdk.h"

/* Whether the light is on: kept from tick to tick, so between dark_lux and bright_lux nothing changes. */
static int on = 0;

PDK_EXPORT("control_logic") int control_logic(void) {{
    pdk_context ctx;
    if (!pdk_read_context(&ctx)) return 1;
    double lux;
    if (!pdk_sensor_value(&ctx, "light_sensor", &lux)) return pdk_commands_done(); /* invalid: no command */
    if (lux > pdk_config_number("bright_lux", 500)) on = 0;
    if (lux < pdk_config_number("dark_lux", 300)) on = 1;
    if (on) pdk_set_high("led_strip"); else pdk_set_low("led_strip");
    return pdk_commands_done();
}}
''',
    "ts": '''// {name}: a light on in the dark, off in bright light. Built by `pi-controller plugin build {name}.ts`.

import {{ Commands, Context, run }} from "pi-controller/pi";

// Whether the light is on: kept from tick to tick, so between dark_lux and bright_lux nothing changes.
let on = false;

export function control_logic(): i32 {{
  return run((ctx: Context, out: Commands): void => {{
    const lux = ctx.value("light_sensor"); // NaN when invalid or missing: no command
    if (isNaN(lux)) return;
    if (lux > ctx.configNumber("bright_lux", 500)) on = false;
    if (lux < ctx.configNumber("dark_lux", 300)) on = true;
    if (on) out.setHigh("led_strip"); else out.setLow("led_strip");
  }});
}}
''',
}

MANIFEST = """# Beside {name}.wasm in the plugins folder. The daemon's config may override any of it.
name: {name}
version: 0.1.0
description: a light on in the dark, off in bright light
author: you
sensors: [light_sensor]      # its context holds only these readings
actuators: [led_strip]       # commands to any other actuator are rejected
# The gap between the two is wider than what the light adds to its own sensor.
config: {{bright_lux: 500, dark_lux: 300}}
"""

#: For `pi-controller plugin call {name}.wasm --context {name}.context.json`: a bright moment, light on.
CONTEXT = """{{
  "sensor_readings": [
    {{"sensor_id": "light_sensor", "value": 900.0, "unit": "lux", "timestamp": 1764017500.1, "valid": true}}
  ],
  "device_states": {{"led_strip": {{"type": "pwm", "on": true, "value": 100.0, "duty_cycle": 100.0}}}},
  "timestamp": 1764017500.1,
  "monotonic": 4210.3,
  "tick": 42,
  "history": {{"light_sensor": [[1764017500.0, 880.0]]}}
}}
"""

#: For `pi-controller simulate --config {name}.scenario.yaml --plugins DIR`: the plugin's devices on
#: simulated pins, and daylight over a five-minute day with what the light adds.
SCENARIO = """# A day in a few seconds for {name}: pi-controller simulate --config {name}.scenario.yaml --duration 15m
# The plugins are this file's folder (or --plugins DIR).
pins:
  factory: mock

sensors:
  - id: light_sensor         # a photodiode amplifier on MCP3008 channel 1, 0..3.3 V = 0..1000 lux
    kind: mcp3008
    channel: 1
    unit: lux
    scale: 1000.0

actuators:
  - id: led_strip            # through a MOSFET
    kind: pwm
    pin: 18

plugins:
  directory: .               # relative to this file

simulation:
  - kind: daylight
    sensor: light_sensor
    lamp: led_strip
    day_length_s: 300          # a five-minute day: dusk and dawn in a short run
    peak_lux: 900
    lamp_lux: 120              # what the strip adds to the sensor at full duty
"""
