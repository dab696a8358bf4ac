//! Test plugin: spins `config.iterations` times (default 1000) on every call, then outputs no
//! command: a CPU cost that is the same on any machine, for fuel budgets.

const pdk = @import("pdk");

var sink: u64 = 0;

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, _: *pdk.Commands) !void {
    const iterations: u64 = @intFromFloat(@max(0, try ctx.configNumber("iterations", 1000)));
    const counter: *volatile u64 = &sink;
    var i: u64 = 0;
    while (i < iterations) : (i += 1) counter.* +%= i;
}
