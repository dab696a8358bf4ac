//! Heater relay with hysteresis.
//!
//! Reading below `setpoint - hysteresis`: heater on (set_high). Above `setpoint + hysteresis`:
//! heater off (set_low). In between: the relay keeps its state, said again every tick, so that a
//! lease on the heater (`command_ttl_s`) holds while the plugin runs and lapses when it stops. An
//! invalid or missing reading switches the heater off (fail safe).
//!
//! config: sensor ("temperature_sensor"), heater ("relay_switch"), setpoint (21.0, celsius),
//! hysteresis (0.5, celsius, >= 0).

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const sensor = try ctx.configString("sensor", "temperature_sensor");
    const heater = try ctx.configString("heater", "relay_switch");
    const setpoint = try ctx.configNumber("setpoint", 21.0);
    const hysteresis = try ctx.configNumber("hysteresis", 0.5);
    if (hysteresis < 0) return pdk.fail("config 'hysteresis' must be >= 0, got {d}", .{hysteresis});

    const temperature = ctx.value(sensor) orelse return out.setLow(heater);
    if (temperature < setpoint - hysteresis) {
        try out.setHigh(heater);
    } else if (temperature > setpoint + hysteresis) {
        try out.setLow(heater);
    } else if (ctx.device(heater)) |state| {
        try if (state.on) out.setHigh(heater) else out.setLow(heater);
    }
}
