//! Test plugin: a control_logic that would work, and a `health_check` export that fails with
//! "calibration table missing": the daemon must refuse it at load, and keep the version it replaces.

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(_: *const pdk.Context, _: *pdk.Commands) !void {}

export fn health_check() i32 {
    pdk.setError("calibration table missing");
    return 1;
}
