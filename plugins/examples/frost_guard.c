/* frost_guard (C example): keeps a pipe from freezing. Below `min_c` (default 5 °C) on `temperature_sensor`
 * it switches `relay_switch` on, above `min_c + band` (default 1) off, in between nothing; an invalid
 * reading switches it on (fail warm). The same logic as a Zig plugin would have, on plugins/src/pdk.h. */

#include "pdk.h"

PDK_EXPORT("control_logic") int control_logic(void) {
    pdk_context ctx;
    if (!pdk_read_context(&ctx)) return 1;
    double min_c = pdk_config_number("min_c", 5), band = pdk_config_number("band", 1), celsius;
    if (!pdk_sensor_value(&ctx, "temperature_sensor", &celsius)) pdk_set_high("relay_switch");
    else if (celsius < min_c) pdk_set_high("relay_switch");
    else if (celsius > min_c + band) pdk_set_low("relay_switch");
    return pdk_commands_done();
}
