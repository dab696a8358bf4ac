/* Test plugin (C): the daemon's host functions through plugins/src/pdk.h. Dims `led_strip` to the mean
 * of `light`'s last 4 readings (as a duty cycle, capped at 100) and logs a line saying so; with no
 * history, it logs a warning and commands nothing. */

#include "pdk.h"

PDK_EXPORT("control_logic") int control_logic(void) {
    pdk_context ctx;
    if (!pdk_read_context(&ctx)) return 1;
    double mean;
    if (!pdk_history_mean("light", 4, &mean)) {
        pdk_log(PDK_WARNING, "no light history");
        return pdk_commands_done();
    }
    pdk_log(PDK_INFO, "{\"message\":\"dimming to the mean\",\"window\":4}");
    pdk_pwm("led_strip", mean > 100 ? 100 : mean);
    return pdk_commands_done();
}
