//! Test plugin: traps on every call (wasm `unreachable`).

export fn control_logic() i32 {
    @trap();
}
