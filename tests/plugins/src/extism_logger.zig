//! Test plugin: writes one line a call to Extism's own log (`log_warn`, which any upstream PDK offers),
//! then answers with no commands: its calls succeed, so only the tick's drain of that log shows its lines.

const pdk = @import("pdk");

extern "extism:host/env" fn log_warn(offset: u64) void;

export fn control_logic() i32 {
    // Extism frees the message block once logged.
    log_warn(pdk.store("a line of this call") catch return 1);
    pdk.setOutput("[]") catch return 1;
    return 0;
}
