/* Test plugin (C): the context's two times as plugins/src/pdk.h reads them: a pwm to "monotonic" with its
 * value and one to "timestamp" with its, each only when the helper finds it (same as clocks_as.ts). */

#include "pdk.h"

PDK_EXPORT("control_logic") int control_logic(void) {
    pdk_context ctx;
    double seconds;
    if (!pdk_read_context(&ctx)) return 1;
    if (pdk_monotonic(&ctx, &seconds)) pdk_pwm("monotonic", seconds);
    if (pdk_timestamp(&ctx, &seconds)) pdk_pwm("timestamp", seconds);
    return pdk_commands_done();
}
