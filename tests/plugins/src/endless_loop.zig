//! Test plugin: never returns. The loop writes a volatile global, so the optimizer cannot drop
//! it; only Extism's timeout ends the call.

var spins: u32 = 0;

export fn control_logic() i32 {
    const counter: *volatile u32 = &spins;
    while (true) counter.* +%= 1;
}
