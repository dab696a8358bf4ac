//! Switches a light off while it is bright anyway.
//!
//! A valid reading above `bright_lux`: set_low on the light. Otherwise (dark enough, or the
//! reading is invalid or missing): no command, so a lower-priority plugin such as motion_light
//! decides.
//!
//! config: sensor ("light_sensor"), light ("led_strip"), bright_lux (500).

const pdk = @import("pdk");

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const sensor = try ctx.configString("sensor", "light_sensor");
    const light = try ctx.configString("light", "led_strip");
    const bright_lux = try ctx.configNumber("bright_lux", 500);

    const lux = ctx.value(sensor) orelse return;
    if (lux > bright_lux) try out.setLow(light);
}
