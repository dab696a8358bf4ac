//! Test plugin: its output is its input, byte for byte, so a test sees exactly the context a
//! plugin gets.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.runRaw(echo);
}

fn echo(allocator: std.mem.Allocator) !void {
    try pdk.setOutput(try pdk.readInput(allocator));
}
