//! Test plugin: reports the error "sensor table corrupt" and returns 1 on every call.

const pdk = @import("pdk");

export fn control_logic() i32 {
    pdk.setError("sensor table corrupt");
    return 1;
}
