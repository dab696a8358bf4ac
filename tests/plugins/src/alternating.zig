//! Benchmark load (benchmarks/tick.py), the plugin of issue 30: it copies its whole input through the
//! PDK, as every plugin reads its context, and answers differently on alternate calls, so no output
//! is the one before it: `config.odd` on the first call, `config.even` on the next, and so on (Extism
//! config: JSON arrays of commands, returned byte for byte; `[]` for one it lacks, so that among the
//! test plugins of a folder it is quiet). A count of its calls in module memory says which.

const std = @import("std");
const pdk = @import("pdk");

var calls: u64 = 0;

export fn control_logic() i32 {
    return pdk.runRaw(answer);
}

fn answer(allocator: std.mem.Allocator) !void {
    _ = try pdk.readInput(allocator);
    calls += 1;
    const key = if (calls % 2 == 0) "even" else "odd";
    const output = try pdk.configGet(allocator, key) orelse "[]";
    try pdk.setOutput(output);
}
