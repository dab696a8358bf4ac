//! Benchmark load: commands every actuator in the context each tick, with values that change
//! every tick (so the daemon really writes every pin): relays alternate, PWM duties step through
//! 0..99 percent, servos step through -45..44 degrees.

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const phase: f64 = @floatFromInt(@mod(ctx.tick, 90));
    var devices = ctx.device_states.map.iterator();
    while (devices.next()) |entry| {
        const id = entry.key_ptr.*;
        const kind = entry.value_ptr.type;
        if (std.mem.eql(u8, kind, "relay")) {
            try if (@mod(ctx.tick, 2) == 0) out.setHigh(id) else out.setLow(id);
        } else if (std.mem.eql(u8, kind, "pwm")) {
            try out.pwm(id, phase);
        } else if (std.mem.eql(u8, kind, "servo")) {
            try out.setAngle(id, phase - 45);
        }
    }
}

const std = @import("std");
