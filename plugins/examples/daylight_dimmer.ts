// daylight_dimmer (AssemblyScript example, on the upstream Extism PDK and plugins/assemblyscript/pi.ts):
// tops the room's light up to `target_lux` with the LED strip. The ambient light is smoothed in an
// Extism var (the upstream PDK's Var: it persists from tick to tick), so a passing cloud does not
// make the strip flicker; the duty is the missing share of the target, 0 once daylight is enough.
// An invalid reading: no command (lower-priority plugins, or the strip's last state, stand).

import { Var } from "@extism/as-pdk";
import { Commands, Context, run } from "pi-controller/pi";

export function control_logic(): i32 {
  return run((ctx: Context, out: Commands): void => {
    const lux = ctx.value(ctx.configString("sensor", "light_sensor"));
    if (isNaN(lux)) return;
    const alpha = ctx.configNumber("smoothing", 0.3); // weight of the newest reading
    const target = ctx.configNumber("target_lux", 400);
    if (!(alpha > 0 && alpha <= 1) || !(target > 0)) throw new Error("need 0 < smoothing <= 1 and target_lux > 0");
    const previous = Var.getString("smoothed_lux");
    const smoothed = previous === null ? lux : alpha * lux + (1 - alpha) * parseFloat(previous);
    Var.set("smoothed_lux", Uint8Array.wrap(String.UTF8.encode(smoothed.toString())));
    const missing = (target - smoothed) / target;
    out.pwm(ctx.configString("light", "led_strip"), missing > 0 ? Math.round(missing * 1000) / 10 : 0);
  });
}
