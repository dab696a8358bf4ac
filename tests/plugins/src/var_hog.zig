//! Test plugin: grows the var "hog" by 1 KiB on every call, without bound, until the daemon's
//! max_var_bytes stops it; outputs no command while it can.

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(_: *const pdk.Context, _: *pdk.Commands) !void {
    const allocator = pdk.callAllocator();
    const previous = try pdk.varGet(allocator, "hog") orelse "";
    const grown = try allocator.alloc(u8, previous.len + 1024);
    @memset(grown, 'x');
    try pdk.varSet("hog", grown);
}
