//! Test plugin: uses the daemon's host functions as its config says (`mode`), politely or not.
//! - "history": outputs the raw `pi_history` answer for `sensor` and `count` ("null" when refused)
//! - "mean": outputs `[mean]` of `sensor` over `count` readings through the PDK ("[null]" if none)
//! - "reads": calls `pi_history` `count` times; outputs how many were answered, as `[n]`
//! - "log": logs `count` lines of `message` at `level` (0..3); outputs `[]`
//! - "flood": calls `pi_log` forever
//! - "garbage": hands the host functions offsets that are no Extism block (0, past the end, inside a
//!   block); outputs the answers

const std = @import("std");
const pdk = @import("pdk");

extern "extism:host/user" fn pi_log(level: u64, message: u64) void;
extern "extism:host/user" fn pi_history(sensor_id: u64, count: u64) u64;

export fn control_logic() i32 {
    return pdk.runRaw(body);
}

fn body(allocator: std.mem.Allocator) !void {
    const ctx = try pdk.parseContext(allocator, try pdk.readInput(allocator));
    const mode = try ctx.configString("mode", "history");
    const sensor = try ctx.configString("sensor", "temperature");
    const count: u32 = @intFromFloat(try ctx.configNumber("count", 5));
    var out: std.Io.Writer.Allocating = .init(allocator);
    const w = &out.writer;
    if (std.mem.eql(u8, mode, "history")) {
        const offset = pi_history(try pdk.store(sensor), count);
        if (offset == 0) try w.writeAll("null") else try w.writeAll(try fromKernel(allocator, offset));
    } else if (std.mem.eql(u8, mode, "mean")) {
        const mean = try pdk.historyMean(allocator, sensor, count);
        if (mean) |m| try w.print("[{d}]", .{m}) else try w.writeAll("[null]");
    } else if (std.mem.eql(u8, mode, "reads")) {
        const key = try pdk.store(sensor);
        var answered: u64 = 0;
        for (0..count) |_| answered += @intFromBool(pi_history(key, 1) != 0);
        try w.print("[{d}]", .{answered});
    } else if (std.mem.eql(u8, mode, "log")) {
        const level: pdk.LogLevel = @enumFromInt(@as(u64, @intFromFloat(try ctx.configNumber("level", 1))));
        const message = try ctx.configString("message", "hello");
        for (0..count) |_| pdk.log(level, "{s}", .{message});
        try w.writeAll("[]");
    } else if (std.mem.eql(u8, mode, "flood")) {
        const message = try pdk.store("flood");
        while (true) pi_log(1, message);
    } else if (std.mem.eql(u8, mode, "garbage")) {
        pi_log(1, 0);
        pi_log(1, 123456789);
        pi_log(7, std.math.maxInt(u64));
        const a = pi_history(0, 10);
        const b = pi_history(987654321, 10);
        const c = pi_history(try pdk.store(sensor), std.math.maxInt(u64));
        const inside = pi_history((try pdk.store(sensor)) + 1, 10); // within a block, not its start
        try w.print("[{d},{d},{d},{d}]", .{ a, b, @intFromBool(c != 0), inside });
    } else return pdk.fail("unknown mode '{s}'", .{mode});
    try pdk.setOutput(out.written());
}

fn fromKernel(allocator: std.mem.Allocator, offset: u64) ![]u8 {
    const bytes = try allocator.alloc(u8, std.math.cast(usize, length(offset)) orelse return error.OutOfMemory);
    for (bytes, 0..) |*b, i| b.* = load_u8(offset + i);
    return bytes;
}

extern "extism:host/env" fn length(offset: u64) u64;
extern "extism:host/env" fn load_u8(offset: u64) u8;
