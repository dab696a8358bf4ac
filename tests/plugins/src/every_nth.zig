//! Test plugin for ownership: it switches `config.device` (default "relay_switch") on (set_high) at its
//! first call and at every `config.every`-th call after (default 4), and says nothing in between. Rejected
//! each time it speaks, it stays under quarantine's default rate (30 faults in 10 s) for good. Its call
//! count is an Extism var.

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const calls = try pdk.countCall("calls");
    const every: u64 = @intFromFloat(@max(1.0, try ctx.configNumber("every", 4)));
    if ((calls - 1) % every == 0) try out.setHigh(try ctx.configString("device", "relay_switch"));
}
