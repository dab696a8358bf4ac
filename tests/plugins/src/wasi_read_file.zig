//! Test plugin: reads a file through WASI from the first directory the host gave it (fd 3, the
//! first preopen) and outputs its first 256 bytes, or `errno N` when WASI refuses. `config.path`
//! names the file within that directory; "../x" and absolute paths must not escape it.

const std = @import("std");
const pdk = @import("pdk");

extern "wasi_snapshot_preview1" fn path_open(dir: i32, dirflags: i32, path: [*]const u8, path_len: usize, oflags: i32, rights: u64, inheriting: u64, fdflags: i32, opened: *i32) u16;
extern "wasi_snapshot_preview1" fn fd_read(fd: i32, iovs: [*]const [2]usize, count: usize, read: *usize) u16;

const first_preopen = 3;
const right_fd_read: u64 = 2;

export fn control_logic() i32 {
    return pdk.runRaw(body);
}

fn body(allocator: std.mem.Allocator) !void {
    const ctx = try pdk.parseContext(allocator, try pdk.readInput(allocator));
    const path = try ctx.configString("path", "note.txt");
    var fd: i32 = -1;
    const opened = path_open(first_preopen, 0, path.ptr, path.len, 0, right_fd_read, 0, 0, &fd);
    var buffer: [256]u8 = undefined;
    if (opened != 0) return pdk.setOutput(try std.fmt.bufPrint(&buffer, "errno {d}", .{opened}));
    const iov = [_][2]usize{.{ @intFromPtr(&buffer), buffer.len }};
    var count: usize = 0;
    const read = fd_read(fd, &iov, 1, &count);
    if (read != 0) return pdk.setOutput(try std.fmt.bufPrint(&buffer, "errno {d}", .{read}));
    try pdk.setOutput(buffer[0..count]);
}
