//! Test plugin: its output is the string `config.output`, byte for byte (decoded from its JSON
//! string, not re-encoded), or `[]` without it. Tests use it to feed the daemon garbage output,
//! JSON that is not a list, and every kind of bad command. For bytes a JSON string cannot carry
//! (invalid UTF-8), give `config.output_hex` instead, e.g. "5bff5d" for `[`, 0xff, `]`.

const std = @import("std");
const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.runRaw(echo);
}

fn echo(allocator: std.mem.Allocator) !void {
    const ctx = try pdk.parseContext(allocator, try pdk.readInput(allocator));
    const hex = try ctx.configString("output_hex", "");
    if (hex.len == 0) return pdk.setOutput(try ctx.configString("output", "[]"));
    const bytes = try allocator.alloc(u8, hex.len / 2);
    _ = std.fmt.hexToBytes(bytes, hex) catch return pdk.fail("config 'output_hex' is not hex", .{});
    try pdk.setOutput(bytes);
}
