//! Test plugin for fleet rollouts: a version that works on most inputs and traps on some. It commands
//! pwm on `config.light` (default "led_strip") at its call count (mod 100), as `counter` does, and traps
//! (wasm `unreachable`) on every `config.trap_every`-th call (default 7): a canary's shadow window of
//! fewer calls misses it, its live window catches it. Its call count is an Extism var.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const allocator = pdk.callAllocator();
    const previous = try pdk.varGet(allocator, "calls");
    const calls: u64 = if (previous) |text| (std.fmt.parseInt(u64, text, 10) catch 0) + 1 else 1;
    var buffer: [20]u8 = undefined;
    try pdk.varSet("calls", std.fmt.bufPrint(&buffer, "{d}", .{calls}) catch unreachable);
    const every: u64 = @intFromFloat(@max(1.0, @min(try ctx.configNumber("trap_every", 7), 1e9)));
    if (calls % every == 0) @trap();
    try out.pwm(try ctx.configString("light", "led_strip"), @floatFromInt(calls % 100));
}
