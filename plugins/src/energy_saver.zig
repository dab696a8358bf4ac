//! Switches a light off while it is bright anyway, and keeps it off until it is dark: the light's
//! own glow on the sensor must not switch it back and forth.
//!
//! Daylight is the reading less the light's own share: `lamp_lux` (what the light adds at full
//! power) times its power from device_states. Above `bright_lux`: set_low on the light, every
//! tick, until the daylight falls below `dark_lux`. Otherwise (dark enough, or the reading is
//! invalid or missing): no command, so a lower-priority plugin such as motion_light decides.
//!
//! config: sensor ("light_sensor"), light ("led_strip"), bright_lux (500), dark_lux (400),
//! lamp_lux (0).

const std = @import("std");
const pdk = @import("pdk");

/// Whether the daylight went above bright_lux and has not yet fallen below dark_lux.
var bright = false;

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const sensor = try ctx.configString("sensor", "light_sensor");
    const light = try ctx.configString("light", "led_strip");
    const bright_lux = try ctx.configNumber("bright_lux", 500);
    const dark_lux = try ctx.configNumber("dark_lux", 400);
    const lamp_lux = try ctx.configNumber("lamp_lux", 0);
    if (dark_lux > bright_lux) return pdk.fail("config 'dark_lux' ({d}) must not be above 'bright_lux' ({d})", .{ dark_lux, bright_lux });

    const lux = ctx.value(sensor) orelse return;
    const daylight = lux - lamp_lux * power(ctx.device(light));
    if (daylight > bright_lux) bright = true else if (daylight < dark_lux) bright = false;
    if (bright) try out.setLow(light);
}

/// The light's power from 0 to 1: a PWM output's duty, a relay's on.
fn power(state: ?pdk.DeviceState) f64 {
    const s = state orelse return 0;
    if (std.mem.eql(u8, s.type, "pwm")) return std.math.clamp((s.value orelse 0) / 100, 0, 1);
    return if (s.on) 1 else 0;
}
