//! Test plugin for ownership: on its first call it switches `config.device` (default "relay_switch")
//! on (set_high); on every later call it says nothing (`config.then` "silent", the default: an empty
//! list) or fails ("fail": an error of its own). Its call count is an Extism var, so a failed call
//! (which keeps the instance) does not make it start over.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const calls = try pdk.countCall("calls");
    if (calls == 1) return out.setHigh(try ctx.configString("device", "relay_switch"));
    if (std.mem.eql(u8, try ctx.configString("then", "silent"), "fail")) {
        return pdk.fail("failing on purpose, call {d}", .{calls});
    }
}
