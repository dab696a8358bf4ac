//! Test plugin: writes to Extism's own log (`log_error`, which any upstream PDK offers) in an endless
//! loop, until its fuel or time runs out: the lines must not flood the daemon's log or stall the tick.

const pdk = @import("pdk");

extern "extism:host/env" fn log_error(offset: u64) void;

export fn control_logic() i32 {
    // Extism frees the message block once logged: a new one every time.
    while (true) log_error(pdk.store("flooding the log") catch return 1);
}
