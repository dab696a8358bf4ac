/* pi_controller PDK for C: the guest side of the pi-controller plugin contract, header only.
 *
 * Build with `pi-controller plugin build` (zig cc, wasm32-freestanding, no libc). A plugin:
 *
 *     #include "pdk.h"
 *
 *     PDK_EXPORT("control_logic") int control_logic(void) {
 *         pdk_context ctx;
 *         if (!pdk_read_context(&ctx)) return 1;
 *         double celsius;
 *         if (!pdk_sensor_value(&ctx, "temperature_sensor", &celsius)) return pdk_commands_done();
 *         if (celsius < pdk_config_number("min_c", 5)) pdk_set_high("relay_switch");
 *         return pdk_commands_done();
 *     }
 *
 * The context is JSON (see docs/plugins.md); this helper finds what a control plugin needs in it
 * without a full parser: a reading's value (only when valid), and the config through Extism config
 * (the daemon passes every config value there, numbers as their JSON text). Commands go into an
 * output buffer that `pdk_commands_done` sends; `pdk_fail` reports an error instead. Memory is
 * static: a context larger than PDK_INPUT_BYTES fails the call, and so do too many commands.
 */
#ifndef PI_CONTROLLER_PDK_H
#define PI_CONTROLLER_PDK_H

#include <stdint.h>

#define PDK_EXPORT(name) __attribute__((export_name(name)))
#define PDK_KERNEL(name) __attribute__((import_module("extism:host/env"), import_name(name)))

PDK_KERNEL("input_length") uint64_t pdk_kernel_input_length(void);
PDK_KERNEL("input_load_u8") uint32_t pdk_kernel_input_load_u8(uint64_t offset);
PDK_KERNEL("alloc") uint64_t pdk_kernel_alloc(uint64_t length);
PDK_KERNEL("free") void pdk_kernel_free(uint64_t offset);
PDK_KERNEL("length") uint64_t pdk_kernel_length(uint64_t offset);
PDK_KERNEL("load_u8") uint32_t pdk_kernel_load_u8(uint64_t offset);
PDK_KERNEL("store_u8") void pdk_kernel_store_u8(uint64_t offset, uint32_t byte);
PDK_KERNEL("output_set") void pdk_kernel_output_set(uint64_t offset, uint64_t length);
PDK_KERNEL("error_set") void pdk_kernel_error_set(uint64_t offset);
PDK_KERNEL("config_get") uint64_t pdk_kernel_config_get(uint64_t key);

/* The daemon's host functions: imported only by a plugin that uses pdk_log or pdk_history_mean. */
#define PDK_DAEMON(name) __attribute__((import_module("extism:host/user"), import_name(name)))
PDK_DAEMON("pi_log") void pdk_daemon_log(uint64_t level, uint64_t message);
PDK_DAEMON("pi_history") uint64_t pdk_daemon_history(uint64_t sensor_id, uint64_t count);

#ifndef PDK_INPUT_BYTES
#define PDK_INPUT_BYTES 16384
#endif
#define PDK_OUTPUT_BYTES 2048

typedef struct {
    const char *json;
    uint32_t length;
} pdk_context;

static char pdk_input[PDK_INPUT_BYTES];
static char pdk_output[PDK_OUTPUT_BYTES];
static uint32_t pdk_output_length;
static int pdk_output_full;

static inline uint32_t pdk_strlen(const char *s) {
    uint32_t n = 0;
    while (s[n]) n++;
    return n;
}

/* Copy bytes into a new block of Extism kernel memory; its offset, or 0 when out of memory. */
static inline uint64_t pdk_store(const char *bytes, uint32_t length) {
    uint64_t offset = pdk_kernel_alloc(length);
    for (uint32_t i = 0; offset && i < length; i++) pdk_kernel_store_u8(offset + i, (uint8_t)bytes[i]);
    return offset;
}

/* Fail the call with `message`: return its result from control_logic. */
static inline int pdk_fail(const char *message) {
    pdk_kernel_error_set(pdk_store(message, pdk_strlen(message)));
    return 1;
}

/* Read this call's context; 0 (with the call failed) when it does not fit PDK_INPUT_BYTES. */
static inline int pdk_read_context(pdk_context *ctx) {
    uint64_t length = pdk_kernel_input_length();
    pdk_output_length = 0;
    pdk_output_full = 0;
    if (length >= PDK_INPUT_BYTES) return !pdk_fail("context larger than PDK_INPUT_BYTES");
    for (uint64_t i = 0; i < length; i++) pdk_input[i] = (char)pdk_kernel_input_load_u8(i);
    pdk_input[length] = 0;
    ctx->json = pdk_input;
    ctx->length = (uint32_t)length;
    return 1;
}

static const char *pdk_find(const char *from, const char *end, const char *needle) {
    uint32_t n = pdk_strlen(needle);
    for (const char *p = from; p + n <= end; p++) {
        uint32_t i = 0;
        while (i < n && p[i] == needle[i]) i++;
        if (i == n) return p;
    }
    return 0;
}

/* A JSON number at `p` (sign, digits, fraction, exponent); 0 if there is none. */
static inline int pdk_parse_number(const char *p, double *out) {
    double sign = 1, value = 0, scale = 1;
    int digits = 0, exponent = 0, exponent_sign = 1;
    if (*p == '-') sign = -1, p++;
    for (; *p >= '0' && *p <= '9'; p++, digits++) value = value * 10 + (*p - '0');
    if (*p == '.')
        for (p++; *p >= '0' && *p <= '9'; p++, digits++) value += (*p - '0') * (scale /= 10);
    if (digits == 0) return 0;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '-' || *p == '+') exponent_sign = *p++ == '-' ? -1 : 1;
        for (; *p >= '0' && *p <= '9'; p++) exponent = exponent * 10 + (*p - '0');
    }
    for (; exponent > 0; exponent--) value = exponent_sign > 0 ? value * 10 : value / 10;
    *out = sign * value;
    return 1;
}

/* The value of sensor `id` if its reading is in the context and valid; returns 0 otherwise. */
static inline int pdk_sensor_value(const pdk_context *ctx, const char *id, double *value) {
    const char *end = ctx->json + ctx->length;
    char needle[96] = "\"sensor_id\":\"";
    uint32_t n = pdk_strlen(needle), i = 0;
    while (id[i] && n + 2 < sizeof needle) needle[n++] = id[i++];
    needle[n++] = '"';
    needle[n] = 0;
    const char *reading = pdk_find(ctx->json, end, needle);
    if (!reading) return 0;
    const char *close = pdk_find(reading, end, "}");
    const char *valid = pdk_find(reading, close ? close : end, "\"valid\":true");
    const char *number = pdk_find(reading, close ? close : end, "\"value\":");
    return valid && number && pdk_parse_number(number + 8, value);
}

/* The context's own keys, from its "timestamp" on ("timestamp":T,"monotonic":M,"tick":N,"config":...):
 * they follow the device states' closing brace, where no reading's "timestamp" can be; an actuator named
 * "timestamp" is followed by its state, not a number. */
static inline const char *pdk_context_tail(const pdk_context *ctx) {
    const char *end = ctx->json + ctx->length;
    double number;
    for (const char *at = pdk_find(ctx->json, end, "},\"timestamp\":"); at; at = pdk_find(at + 1, end, "},\"timestamp\":"))
        if (pdk_parse_number(at + 14, &number)) return at + 2;
    return 0;
}

/* The context's `timestamp`: Unix seconds of this tick on the wall clock, for the time of day. It jumps
 * when the clock is set (NTP steps a Pi's clock after boot): never time anything with it. 0 if absent. */
static inline int pdk_timestamp(const pdk_context *ctx, double *seconds) {
    const char *tail = pdk_context_tail(ctx);
    return tail && pdk_parse_number(tail + 12, seconds);
}

/* The context's `monotonic`: seconds of this tick on a clock that never jumps (only differences mean
 * anything), for timers, holds and rates; use these two, never a clock of your own. 0 if absent (a
 * daemon older than the field). */
static inline int pdk_monotonic(const pdk_context *ctx, double *seconds) {
    const char *end = ctx->json + ctx->length, *tail = pdk_context_tail(ctx);
    const char *tick = tail ? pdk_find(tail, end, ",\"tick\":") : 0;
    const char *at = tail ? pdk_find(tail, tick ? tick : end, ",\"monotonic\":") : 0;
    return at && pdk_parse_number(at + 13, seconds);
}

/* Config `key` as a number (from Extism config), or `fallback` when absent or not a number. */
static inline double pdk_config_number(const char *key, double fallback) {
    uint64_t offset = pdk_kernel_config_get(pdk_store(key, pdk_strlen(key)));
    if (!offset) return fallback;
    char text[64];
    uint64_t length = pdk_kernel_length(offset);
    uint32_t i = 0;
    for (; i < length && i + 1 < sizeof text; i++) text[i] = (char)pdk_kernel_load_u8(offset + i);
    text[i] = 0;
    pdk_kernel_free(offset);
    double value;
    return pdk_parse_number(text, &value) ? value : fallback;
}

enum { PDK_DEBUG, PDK_INFO, PDK_WARNING, PDK_ERROR };

/* One line in the daemon's log at `level` (PDK_INFO...), with this plugin's name and the tick. The
 * daemon rate-limits each plugin's lines; a JSON object as `text` brings fields of its own. */
static inline void pdk_log(int level, const char *text) {
    uint64_t offset = pdk_store(text, pdk_strlen(text));
    if (!offset) return;
    pdk_daemon_log((uint64_t)level, offset);
    pdk_kernel_free(offset);
}

/* The mean of sensor `id` over its last `count` valid readings (the daemon's history, this tick's
 * reading last); 0 when the daemon refuses (sensor unknown or not granted) or has none yet. */
static inline int pdk_history_mean(const char *id, uint32_t count, double *mean) {
    uint64_t key = pdk_store(id, pdk_strlen(id));
    uint64_t offset = key ? pdk_daemon_history(key, count) : 0;
    if (key) pdk_kernel_free(key);
    if (!offset) return 0;
    /* "[[t,v],[t,v],...]": a value runs from the comma inside a pair to the pair's "]". */
    uint64_t length = pdk_kernel_length(offset);
    double sum = 0, value;
    uint32_t n = 0, k = 0;
    int depth = 0, in_value = 0;
    char number[40];
    for (uint64_t i = 0; i < length; i++) {
        char c = (char)pdk_kernel_load_u8(offset + i);
        if (c == '[') {
            depth++;
        } else if (c == ',' && depth == 2) {
            in_value = 1, k = 0;
        } else if (c == ']') {
            number[k] = 0;
            if (depth-- == 2 && in_value && pdk_parse_number(number, &value)) sum += value, n++;
            in_value = 0;
        } else if (in_value && k + 1 < sizeof number) {
            number[k++] = c;
        }
    }
    pdk_kernel_free(offset);
    if (!n) return 0;
    *mean = sum / n;
    return 1;
}

static inline void pdk_append(const char *text) {
    uint32_t n = pdk_strlen(text);
    if (pdk_output_length + n + 2 > PDK_OUTPUT_BYTES) {
        pdk_output_full = 1;
        return;
    }
    for (uint32_t i = 0; i < n; i++) pdk_output[pdk_output_length++] = text[i];
}

/* `value` with three decimals (JSON has no NaN: the daemon would reject it anyway). */
static inline void pdk_append_number(double value) {
    char text[32];
    int i = 31;
    text[i] = 0;
    int negative = value < 0;
    uint64_t thousandths = (uint64_t)((negative ? -value : value) * 1000 + 0.5);
    for (int digit = 0; digit < 3; digit++, thousandths /= 10) text[--i] = (char)('0' + thousandths % 10);
    text[--i] = '.';
    do text[--i] = (char)('0' + thousandths % 10); while ((thousandths /= 10) && i > 1);
    if (negative) text[--i] = '-';
    pdk_append(text + i);
}

static inline void pdk_command(const char *device, const char *action, const char *parameter, double amount) {
    pdk_append(pdk_output_length ? ",{\"device_id\":\"" : "{\"device_id\":\"");
    pdk_append(device);
    pdk_append("\",\"action\":\"");
    pdk_append(action);
    pdk_append("\",\"parameters\":{");
    if (parameter) {
        pdk_append("\"");
        pdk_append(parameter);
        pdk_append("\":");
        pdk_append_number(amount);
    }
    pdk_append("}}");
}

static inline void pdk_set_high(const char *device) { pdk_command(device, "set_high", 0, 0); }
static inline void pdk_set_low(const char *device) { pdk_command(device, "set_low", 0, 0); }
static inline void pdk_pwm(const char *device, double duty) { pdk_command(device, "pwm", "duty_cycle", duty); }
static inline void pdk_set_angle(const char *device, double angle) { pdk_command(device, "set_angle", "angle", angle); }

/* Send the commands added so far as the output (none: `[]`); return its result from control_logic. */
static inline int pdk_commands_done(void) {
    if (pdk_output_full) return pdk_fail("too many commands for PDK_OUTPUT_BYTES");
    char framed[PDK_OUTPUT_BYTES + 2];
    framed[0] = '[';
    for (uint32_t i = 0; i < pdk_output_length; i++) framed[i + 1] = pdk_output[i];
    framed[pdk_output_length + 1] = ']';
    uint64_t offset = pdk_store(framed, pdk_output_length + 2);
    if (!offset) return pdk_fail("out of memory");
    pdk_kernel_output_set(offset, pdk_output_length + 2);
    return 0;
}

#endif
