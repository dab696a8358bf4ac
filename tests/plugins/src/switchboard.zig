//! Test plugin for the stateful tests (tests/daemon_machine.py): what it does each call is a switch
//! in its config, so that one module, copied under several names and given several configs, plays
//! every kind of plugin the daemon meets.
//!
//! `config.mode`: "on" (set_high, or pwm at `config.duty`, default 100, on a PWM output), "off"
//! (set_low, or pwm 0), "silent" (no command, the default), "trap" (wasm `unreachable`), "error" (an
//! error of its own) or "garbage" (output that is not JSON). The command goes to `config.device`
//! (default "heater"), granted or not, existing or not: the daemon decides what it may drive.
//! `config.every` (default 1): only every Nth call commands anything, as a plugin that speaks on
//! change does; its call count is an Extism var.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.runRaw(step);
}

fn step(allocator: std.mem.Allocator) !void {
    const ctx = try pdk.parseContext(allocator, try pdk.readInput(allocator));
    const mode = try ctx.configString("mode", "silent");
    if (std.mem.eql(u8, mode, "trap")) @trap();
    if (std.mem.eql(u8, mode, "error")) return pdk.fail("failing on purpose (mode error)", .{});
    if (std.mem.eql(u8, mode, "garbage")) return pdk.setOutput("this is not json {");
    var out: pdk.Commands = .{ .allocator = allocator };
    if (try speaks(&ctx)) {
        const device = try ctx.configString("device", "heater");
        const pwm = if (ctx.device(device)) |state| std.mem.eql(u8, state.type, "pwm") else false;
        if (std.mem.eql(u8, mode, "on")) {
            if (pwm) try out.pwm(device, try ctx.configNumber("duty", 100)) else try out.setHigh(device);
        } else if (std.mem.eql(u8, mode, "off")) {
            if (pwm) try out.pwm(device, 0) else try out.setLow(device);
        }
    }
    try pdk.setOutput(try out.toJson(allocator));
}

/// Whether this call is one of every `config.every` calls.
fn speaks(ctx: *const pdk.Context) !bool {
    const every = try ctx.configNumber("every", 1);
    const calls = try pdk.countCall("calls");
    return every <= 1 or calls % @as(u64, @intFromFloat(@min(every, 1e9))) == 0;
}
