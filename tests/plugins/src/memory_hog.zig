//! Test plugin: grows linear memory one page at a time without bound, touching every new page,
//! until Extism's memory limit (max_pages) stops it. Should a grow fail without trapping, it
//! traps itself, like a program that runs out of memory.

const page_size = 64 * 1024;

export fn control_logic() i32 {
    while (true) {
        const previous = @wasmMemoryGrow(0, 1);
        if (previous < 0) @trap();
        const page: [*]volatile u8 = @ptrFromInt(@as(usize, @intCast(previous)) * page_size);
        page[0] = 1;
        page[page_size - 1] = 1;
    }
}
