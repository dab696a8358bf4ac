//! Test plugin: makes an HTTP GET to `config.url` (default https://example.com/) through Extism's
//! http_request on every call, and outputs no command. With no allowed host, Extism denies it.

const std = @import("std");
const pdk = @import("pdk");

extern "extism:host/env" fn http_request(request: u64, body: u64) u64;

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, _: *pdk.Commands) !void {
    const url = try ctx.configString("url", "https://example.com/");
    const allocator = pdk.callAllocator();
    const request = try std.fmt.allocPrint(allocator, "{{\"url\":\"{s}\",\"method\":\"GET\"}}", .{url});
    _ = http_request(try pdk.store(request), 0);
}
