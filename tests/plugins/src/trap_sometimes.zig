//! Test plugin for fleet rollouts: a version that works on most inputs and traps on some. It commands
//! pwm on `config.light` (default "led_strip") at its call count (mod 100), as `counter` does, and traps
//! (wasm `unreachable`) on every `config.trap_every`-th call (default 7): a canary's shadow window of
//! fewer calls misses it, its live window catches it. Its call count is an Extism var.

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const calls = try pdk.countCall("calls");
    const every: u64 = @intFromFloat(@max(1.0, @min(try ctx.configNumber("trap_every", 7), 1e9)));
    if (calls % every == 0) @trap();
    try out.pwm(try ctx.configString("light", "led_strip"), @floatFromInt(calls % 100));
}
