//! Test plugin: imports WASI's fd_write (to print), which the daemon never grants: it must fail
//! to load ("unknown import"), not run.

extern "wasi_snapshot_preview1" fn fd_write(fd: i32, iovs: [*]const [2]u32, count: i32, written: *u32) i32;

export fn control_logic() i32 {
    var written: u32 = 0;
    const iov = [_][2]u32{.{ 0, 0 }};
    return fd_write(1, &iov, 1, &written);
}
