//! Test plugin: state in Extism vars and config through Extism config. Counts its calls in the var
//! "calls" and commands pwm on `config.light` (Extism config, default "led_strip") with that count
//! (mod 100) as the duty: a duty that climbs tick by tick shows the var persists between calls.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    _ = ctx;
    const allocator = pdk.callAllocator();
    const calls = try pdk.countCall("calls");
    const light = try pdk.configGet(allocator, "light") orelse "led_strip";
    try out.pwm(light, @floatFromInt(calls % 100));
}
