// Test plugin (AssemblyScript): the daemon's host functions through plugins/assemblyscript/pi.ts, the
// same behaviour as smoothed_light.c. Dims `led_strip` to the mean of `light`'s last 4 readings
// (capped at 100) and logs a line saying so; with no history, logs a warning and commands nothing.

import { Commands, Context, Level, historyMean, log, run } from "pi-controller/pi";

export function control_logic(): i32 {
  return run((ctx: Context, out: Commands): void => {
    const mean = historyMean("light", 4);
    if (isNaN(mean)) {
      log(Level.Warning, "no light history");
      return;
    }
    log(Level.Info, '{"message":"dimming to the mean","window":4}');
    out.pwm("led_strip", mean > 100 ? 100 : mean);
  });
}
