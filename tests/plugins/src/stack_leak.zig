//! Test plugin, written without our PDK (which puts the stack back on every call): each call takes
//! a 20 KiB stack frame, then traps when its input starts with 't' and outputs `[]` otherwise. A
//! trapped call never pops its frame; were the instance kept, the next call would overflow the
//! 32 KiB stack. The daemon rebuilds the instance after a trap, so the next call works.

extern "extism:host/env" fn input_length() u64;
extern "extism:host/env" fn input_load_u8(offset: u64) u8;
extern "extism:host/env" fn alloc(length: u64) u64;
extern "extism:host/env" fn store_u8(offset: u64, byte: u8) void;
extern "extism:host/env" fn output_set(offset: u64, length: u64) void;

export fn control_logic() i32 {
    return @call(.never_inline, deep, .{});
}

fn deep() i32 {
    var frame: [20 * 1024]u8 = undefined;
    const volatile_frame: *volatile [20 * 1024]u8 = &frame;
    volatile_frame[0] = 1;
    volatile_frame[frame.len - 1] = 1;
    if (input_length() > 0 and input_load_u8(0) == 't') @trap();
    const output = alloc(2);
    store_u8(output, '[');
    store_u8(output + 1, ']');
    output_set(output, 2);
    return 0;
}
