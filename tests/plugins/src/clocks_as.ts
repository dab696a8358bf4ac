// Test plugin (AssemblyScript): the context's two times as plugins/assemblyscript/pi.ts reads them: a pwm to
// "monotonic" with its value and one to "timestamp" with its, each only when the helper finds it (as clocks.c).

import { Commands, Context, run } from "pi-controller/pi";

export function control_logic(): i32 {
  return run((ctx: Context, out: Commands): void => {
    if (!isNaN(ctx.monotonic)) out.pwm("monotonic", ctx.monotonic);
    if (!isNaN(ctx.timestamp)) out.pwm("timestamp", ctx.timestamp);
  });
}
