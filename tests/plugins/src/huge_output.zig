//! Test plugin: outputs a valid but 1 MiB JSON array (`[` then spaces then `]`), far past the
//! daemon's max_output_bytes.

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.runRaw(flood);
}

fn flood(allocator: @import("std").mem.Allocator) !void {
    const bytes = try allocator.alloc(u8, 1024 * 1024);
    @memset(bytes, ' ');
    bytes[0] = '[';
    bytes[bytes.len - 1] = ']';
    try pdk.setOutput(bytes);
}
