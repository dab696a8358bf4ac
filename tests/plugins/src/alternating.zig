//! Benchmark load (benchmarks/tick.py): a plugin that reads its whole context (`pdk.run` parses
//! every reading, every device state and its config) and answers differently on alternate ticks,
//! so no output is ever the one before: it commands each actuator named in `config.devices`
//! (comma-separated), as its kind in `device_states` says: relays on and off, PWM duty 40 and
//! 60 %, servos 30 and 60 degrees.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const even = @mod(ctx.tick, 2) == 0;
    var names = std.mem.splitScalar(u8, try ctx.configString("devices", ""), ',');
    while (names.next()) |id| {
        const state = ctx.device(id) orelse continue;
        if (std.mem.eql(u8, state.type, "relay")) {
            try if (even) out.setHigh(id) else out.setLow(id);
        } else if (std.mem.eql(u8, state.type, "pwm")) {
            try out.pwm(id, if (even) 40 else 60);
        } else if (std.mem.eql(u8, state.type, "servo")) {
            try out.setAngle(id, if (even) 30 else 60);
        }
    }
}
