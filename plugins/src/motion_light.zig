//! Motion-activated light with hold time and a linear fade-out.
//!
//! Motion (a valid reading >= 0.5): pwm `on_duty`, and the tick's monotonic time is remembered as the
//! last motion. After motion ends the light stays at `on_duty` for `hold_seconds`, then fades
//! linearly to 0 over `fade_seconds` (one pwm per call with the intermediate duty). When the
//! fade is over it sends pwm 0 once and then stays quiet (no command) until the next motion, so
//! other plugins may use the light meanwhile. Before the first motion it is quiet too. An
//! invalid or missing motion reading counts as "no motion", so the light still goes off.
//!
//! Time is the context's `monotonic`, never the wall-clock `timestamp`: NTP stepping the clock at
//! boot must neither cut a hold short nor stretch it. Should it ever go backwards (a hand-made
//! context), the hold restarts from the new time instead of lasting until the old one comes round.
//!
//! config: sensor ("motion_sensor"), light ("led_strip"), on_duty (100, percent, 0..100),
//! hold_seconds (30, >= 0), fade_seconds (5, >= 0).

const pdk = @import("pdk");

/// Monotonic time of the last tick with motion; null when idle (never seen, or fade finished).
var last_motion: ?f64 = null;

export fn control_logic() i32 {
    return pdk.run(step);
}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
    const sensor = try ctx.configString("sensor", "motion_sensor");
    const light = try ctx.configString("light", "led_strip");
    const on_duty = try ctx.configNumber("on_duty", 100);
    const hold = try ctx.configNumber("hold_seconds", 30);
    const fade = try ctx.configNumber("fade_seconds", 5);
    if (on_duty < 0 or on_duty > 100) return pdk.fail("config 'on_duty' must be within 0..100, got {d}", .{on_duty});
    if (hold < 0) return pdk.fail("config 'hold_seconds' must be >= 0, got {d}", .{hold});
    if (fade < 0) return pdk.fail("config 'fade_seconds' must be >= 0, got {d}", .{fade});

    const now = ctx.monotonic;
    if ((ctx.value(sensor) orelse 0) >= 0.5) last_motion = now;
    const since = last_motion orelse return; // idle: quiet
    if (now < since) last_motion = now; // the clock went backwards: restart the hold

    const elapsed = @max(now - since, 0);
    if (elapsed < hold) return out.pwm(light, on_duty);
    if (elapsed < hold + fade) return out.pwm(light, on_duty * (1 - (elapsed - hold) / fade));
    last_motion = null; // fade over: off once, then quiet
    try out.pwm(light, 0);
}
