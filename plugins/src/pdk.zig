//! pi_controller PDK: the guest side of the pi-controller plugin contract, for plugins in Zig.
//!
//! A plugin is a wasm32-freestanding module that exports `control_logic() i32`. The daemon calls
//! it once per control tick through Extism (no WASI; the daemon's own host functions `log` and
//! `history` below are there if the plugin uses them) with one JSON
//! context (sensor readings, device states, timestamp, tick, the plugin's own config) and takes
//! a JSON array of commands back. The shortest plugin:
//!
//! ```zig
//! const pdk = @import("pdk");
//!
//! export fn control_logic() i32 {
//!     return pdk.run(step);
//! }
//!
//! fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {
//!     const light = try ctx.configString("light", "led_strip");
//!     const lux = ctx.value("light_sensor") orelse return; // invalid or missing: no command
//!     if (lux > try ctx.configNumber("bright_lux", 500)) try out.setLow(light);
//! }
//! ```
//!
//! Build it with `python -m pi_controller.plugins.build` (see plugins/README.md).
//!
//! Memory: each call allocates from a heap that is emptied when the next call starts, so
//! nothing `step` allocates and no slice of the context outlives the call. State kept between
//! calls (the Extism instance persists from tick to tick, even after a failed call) goes in
//! module-level `var`s holding plain values (numbers, bools, enums), never slices into the
//! context. `run` also puts the stack back at the start of each call, so a call that trapped
//! or timed out leaks neither heap nor stack.
//!
//! Errors: return `pdk.fail("...", .{...})` (or any other Zig error) from `step`; `run` reports
//! the message through Extism's `error_set` and returns 1. The daemon then logs the message and
//! applies no command from this plugin this tick, so also emit nothing you want undone.

const std = @import("std");
const Allocator = std.mem.Allocator;

/// The Extism kernel functions this PDK uses (import module "extism:host/env"). Offsets and
/// lengths address the kernel's own memory, not this module's; wasm types in the comments.
const kernel = struct {
    extern "extism:host/env" fn input_length() u64; // () -> i64
    extern "extism:host/env" fn input_load_u8(offset: u64) u8; // (i64) -> i32
    extern "extism:host/env" fn input_load_u64(offset: u64) u64; // (i64) -> i64
    extern "extism:host/env" fn alloc(length: u64) u64; // (i64) -> i64, 0 when out of memory
    extern "extism:host/env" fn store_u8(offset: u64, byte: u8) void; // (i64, i32) -> ()
    extern "extism:host/env" fn store_u64(offset: u64, word: u64) void; // (i64, i64) -> ()
    extern "extism:host/env" fn output_set(offset: u64, length: u64) void; // (i64, i64) -> ()
    extern "extism:host/env" fn error_set(offset: u64) void; // (i64) -> ()
    extern "extism:host/env" fn length(offset: u64) u64; // (i64) -> i64
    extern "extism:host/env" fn load_u8(offset: u64) u8; // (i64) -> i32
    extern "extism:host/env" fn load_u64(offset: u64) u64; // (i64) -> i64
    extern "extism:host/env" fn free(offset: u64) void; // (i64) -> ()
    extern "extism:host/env" fn config_get(key: u64) u64; // (i64) -> i64, 0 when absent
    extern "extism:host/env" fn var_get(key: u64) u64; // (i64) -> i64, 0 when absent
    extern "extism:host/env" fn var_set(key: u64, value: u64) void; // (i64, i64) -> (), value 0 deletes
};

// ---------------------------------------------------------------------------------------------
// The context
// ---------------------------------------------------------------------------------------------

/// One sensor reading. `value` is null exactly when the reading is invalid; prefer
/// `Context.value`, which also checks `valid` and finiteness.
pub const Reading = struct {
    sensor_id: []const u8 = "",
    value: ?f64 = null,
    unit: []const u8 = "",
    timestamp: f64 = 0,
    valid: bool = false,
    /// Why the reading is invalid (e.g. "SPI read failed"), when it is.
    @"error": ?[]const u8 = null,

    /// The value if the reading is valid and a finite number, else null.
    pub fn number(self: Reading) ?f64 {
        const v = self.value orelse return null;
        return if (self.valid and std.math.isFinite(v)) v else null;
    }
};

/// The last applied state of one actuator: `type` is "relay", "pwm" or "servo"; `value` is
/// 0/1 for a relay, the duty cycle in percent for pwm, the angle in degrees for a servo.
pub const DeviceState = struct {
    type: []const u8 = "",
    on: bool = false,
    value: ?f64 = null,
};

/// Everything a plugin gets on one call. Unknown fields are ignored, so the contract can grow.
pub const Context = struct {
    sensor_readings: []const Reading = &.{},
    device_states: std.json.ArrayHashMap(DeviceState) = .{},
    /// Unix seconds of this tick, on the wall clock: for the time of day. It jumps when the clock is
    /// set (a Pi has no real-time clock: NTP steps it after boot), so never time anything with it.
    timestamp: f64 = 0,
    /// Seconds of this tick on a clock that never jumps (the daemon's monotonic clock; only
    /// differences mean anything): for timers, holds and rates. Use these two, never a clock of
    /// your own.
    monotonic: f64 = 0,
    /// Tick counter, increasing by one per control tick.
    tick: i64 = 0,
    /// This plugin's config map from the daemon's YAML, as is (numbers, strings, bools, nested).
    config: std.json.Value = .null,

    /// The first reading from `sensor_id`, valid or not; null if the sensor is not in the context.
    pub fn reading(self: *const Context, sensor_id: []const u8) ?*const Reading {
        for (self.sensor_readings) |*r| {
            if (std.mem.eql(u8, r.sensor_id, sensor_id)) return r;
        }
        return null;
    }

    /// The value of `sensor_id` if it is present, valid and finite; null otherwise.
    pub fn value(self: *const Context, sensor_id: []const u8) ?f64 {
        const r = self.reading(sensor_id) orelse return null;
        return r.number();
    }

    /// The state of actuator `device_id`, or null if the daemon did not report it.
    pub fn device(self: *const Context, device_id: []const u8) ?DeviceState {
        return self.device_states.map.get(device_id);
    }

    /// The raw config entry `key`; null if absent, JSON null, or the config is not an object.
    pub fn configValue(self: *const Context, key: []const u8) ?std.json.Value {
        if (self.config != .object) return null;
        const v = self.config.object.get(key) orelse return null;
        return if (v == .null) null else v;
    }

    /// Config entry `key` as a finite number: a JSON number or a numeric string ("0.5"), or
    /// `default` when absent. Anything else fails the call with a message naming the key.
    pub fn configNumber(self: *const Context, key: []const u8, default: f64) Error!f64 {
        const v = self.configValue(key) orelse return default;
        const n: f64 = switch (v) {
            .integer => |i| @floatFromInt(i),
            .float => |f| f,
            .number_string, .string => |s| std.fmt.parseFloat(f64, std.mem.trim(u8, s, " \t")) catch
                return fail("config '{s}' must be a number, got \"{s}\"", .{ key, s }),
            else => return fail("config '{s}' must be a number, got {s}", .{ key, @tagName(v) }),
        };
        if (!std.math.isFinite(n)) return fail("config '{s}' must be finite", .{key});
        return n;
    }

    /// Config entry `key` as a string, or `default` when absent; anything else fails the call.
    pub fn configString(self: *const Context, key: []const u8, default: []const u8) Error![]const u8 {
        const v = self.configValue(key) orelse return default;
        return switch (v) {
            .string => |s| s,
            else => fail("config '{s}' must be a string, got {s}", .{ key, @tagName(v) }),
        };
    }

    /// Config entry `key` as a bool (JSON true/false), or `default` when absent.
    pub fn configBool(self: *const Context, key: []const u8, default: bool) Error!bool {
        const v = self.configValue(key) orelse return default;
        return switch (v) {
            .bool => |b| b,
            else => fail("config '{s}' must be true or false, got {s}", .{ key, @tagName(v) }),
        };
    }
};

/// Parse a context document. Slices in the result point into `input` or into `allocator`'s
/// memory (`callAllocator()`, or another arena-like allocator: nothing is freed piecemeal).
pub fn parseContext(allocator: Allocator, input: []const u8) Error!Context {
    return std.json.parseFromSliceLeaky(Context, allocator, input, .{
        .ignore_unknown_fields = true,
        .duplicate_field_behavior = .use_last,
    }) catch |err| switch (err) {
        error.OutOfMemory => error.OutOfMemory,
        else => fail("context does not match the contract: {s}", .{@errorName(err)}),
    };
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// What a command asks of an actuator.
pub const Action = enum { set_high, set_low, pwm, set_angle };

/// One command: `amount` is the duty cycle (percent) for `pwm`, the angle (degrees) for
/// `set_angle`, unused otherwise.
pub const Command = struct {
    device_id: []const u8,
    action: Action,
    amount: f64 = 0,
};

/// The commands of one call, written as the call's output by `run`. No command at all (the
/// empty list) means "nothing to do this tick": lower-priority plugins then decide.
pub const Commands = struct {
    allocator: Allocator,
    items: std.ArrayList(Command) = .empty,

    /// Switch a relay (or any digital output) on.
    pub fn setHigh(self: *Commands, device_id: []const u8) Error!void {
        try self.add(.{ .device_id = device_id, .action = .set_high });
    }

    /// Switch a relay (or any digital output) off.
    pub fn setLow(self: *Commands, device_id: []const u8) Error!void {
        try self.add(.{ .device_id = device_id, .action = .set_low });
    }

    /// Set a PWM output's duty cycle in percent; the daemon rejects values outside 0..100.
    pub fn pwm(self: *Commands, device_id: []const u8, duty_cycle: f64) Error!void {
        try self.add(.{ .device_id = device_id, .action = .pwm, .amount = duty_cycle });
    }

    /// Turn a servo to `angle` degrees; the daemon rejects angles outside the servo's range.
    pub fn setAngle(self: *Commands, device_id: []const u8, angle: f64) Error!void {
        try self.add(.{ .device_id = device_id, .action = .set_angle, .amount = angle });
    }

    /// Append a command; a non-finite amount fails the call (JSON has no NaN or infinity).
    pub fn add(self: *Commands, command: Command) Error!void {
        if (!std.math.isFinite(command.amount))
            return fail("{s} on '{s}': amount must be finite", .{ @tagName(command.action), command.device_id });
        try self.items.append(self.allocator, command);
    }

    /// The commands as the contract's JSON array, e.g.
    /// `[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":40}}]`.
    pub fn toJson(self: *const Commands, allocator: Allocator) Error![]u8 {
        var buffer: std.Io.Writer.Allocating = .init(allocator);
        writeJson(self.items.items, &buffer.writer) catch return error.OutOfMemory;
        return buffer.written();
    }

    fn writeJson(commands: []const Command, writer: *std.Io.Writer) std.Io.Writer.Error!void {
        var json: std.json.Stringify = .{ .writer = writer };
        try json.beginArray();
        for (commands) |c| {
            try json.beginObject();
            try json.objectField("device_id");
            try json.write(c.device_id);
            try json.objectField("action");
            try json.write(@tagName(c.action));
            try json.objectField("parameters");
            try json.beginObject();
            switch (c.action) {
                .pwm => try json.objectField("duty_cycle"),
                .set_angle => try json.objectField("angle"),
                .set_high, .set_low => {},
            }
            if (c.action == .pwm or c.action == .set_angle) try json.write(c.amount);
            try json.endObject();
            try json.endObject();
        }
        try json.endArray();
    }
};

// ---------------------------------------------------------------------------------------------
// Running a call
// ---------------------------------------------------------------------------------------------

/// The errors of this PDK: `PluginFailed` carries a message (see `fail`).
pub const Error = error{ PluginFailed, OutOfMemory };

var message_buffer: [512]u8 = undefined;
var message: []const u8 = "";

/// Fail the call with a formatted message (truncated to 512 bytes): `return pdk.fail(...)`.
pub fn fail(comptime fmt: []const u8, args: anytype) error{PluginFailed} {
    var writer: std.Io.Writer = .fixed(&message_buffer);
    writer.print(fmt, args) catch {};
    message = writer.buffered();
    return error.PluginFailed;
}

/// The whole call for a plugin: read and parse the context, call `step(&context, &commands)`,
/// write the commands as output and return 0; on any error report it and return 1.
/// `step` is any `fn (*const Context, *Commands) !void`. Use it as the whole body of
/// `control_logic`: `return pdk.run(step);`.
pub inline fn run(comptime step: anytype) i32 {
    return runRaw(struct {
        fn body(allocator: Allocator) !void {
            const context = try parseContext(allocator, try readInput(allocator));
            var commands: Commands = .{ .allocator = allocator };
            try step(&context, &commands);
            try setOutput(try commands.toJson(allocator));
        }
    }.body);
}

/// Like `run`, for a plugin that reads its input and sets its output itself (`readInput`,
/// `parseContext`, `setOutput`): calls `body(allocator)`, `allocator` being a fresh
/// `callAllocator()`; returns 0, or reports the error and returns 1. Use it as the whole body
/// of `control_logic`: `return pdk.runRaw(body);`.
pub inline fn runRaw(comptime body: fn (Allocator) anyerror!void) i32 {
    resetStack();
    return @call(.never_inline, guarded, .{body});
}

fn guarded(comptime body: fn (Allocator) anyerror!void) i32 {
    body(callAllocator()) catch |err| return reportError(err);
    return 0;
}

/// The shadow stack pointer on entry to the first call.
var stack_top: usize = 0;

/// Put the shadow stack pointer (the wasm global `__stack_pointer`) back where it was on entry
/// to the first call. A call that traps, runs out of memory or times out never pops its stack
/// frames, and the Extism instance lives on: without this, every such call would leak its
/// stack depth until the 32 KiB stack is gone and every later call traps. It must run before
/// anything uses the stack, so `run`/`runRaw` are inline and call the rest never-inline.
inline fn resetStack() void {
    const sp = asm volatile (
        \\ global.get __stack_pointer
        \\ local.set %[sp]
        : [sp] "=r" (-> usize),
    );
    if (stack_top == 0) {
        stack_top = sp;
    } else if (sp != stack_top) {
        asm volatile (
            \\ local.get %[sp]
            \\ global.set __stack_pointer
            :
            : [sp] "r" (stack_top),
        );
    }
}

var heap: CallHeap = .{};

/// The allocator for one call, emptied when it is fetched: `run`/`runRaw` fetch it once per
/// call. Memory a call allocated is reclaimed by the next call even if that one trapped, ran
/// out of memory or was stopped by the timeout.
pub fn callAllocator() Allocator {
    heap.reset();
    return .{ .ptr = &heap, .vtable = &.{
        .alloc = CallHeap.alloc,
        .resize = CallHeap.resize,
        .remap = CallHeap.remap,
        .free = CallHeap.free,
    } };
}

/// A bump allocator over the linear memory above the module's initial memory (stack and data),
/// growing it a page at a time (memory.grow) and starting from the bottom again on every call.
/// No fragmentation: an instance needs its initial memory plus what its largest call used.
/// The last allocation can grow and shrink in place (so lists and writers grow cheaply).
const CallHeap = struct {
    base: usize = 0, // where the heap starts: the end of the initial memory
    top: usize = 0, // the end of the last allocation
    limit: usize = 0, // the end of linear memory

    const page_size = 64 * 1024;

    fn reset(self: *CallHeap) void {
        if (self.base == 0) {
            self.base = @wasmMemorySize(0) * page_size;
            self.limit = self.base;
        }
        self.top = self.base;
    }

    /// Grow linear memory so that it ends at or after `end`; false if the host refuses.
    fn reserve(self: *CallHeap, end: usize) bool {
        if (end <= self.limit) return true;
        const pages = (end - self.limit + page_size - 1) / page_size;
        if (@wasmMemoryGrow(0, pages) < 0) return false;
        self.limit += pages * page_size;
        return true;
    }

    fn alloc(ctx: *anyopaque, len: usize, alignment: std.mem.Alignment, _: usize) ?[*]u8 {
        const self: *CallHeap = @ptrCast(@alignCast(ctx));
        const start = alignment.forward(self.top);
        const end = std.math.add(usize, start, len) catch return null;
        if (!self.reserve(end)) return null;
        self.top = end;
        return @ptrFromInt(start);
    }

    fn resize(ctx: *anyopaque, memory: []u8, _: std.mem.Alignment, new_len: usize, _: usize) bool {
        const self: *CallHeap = @ptrCast(@alignCast(ctx));
        const start = @intFromPtr(memory.ptr);
        if (start + memory.len != self.top) return new_len <= memory.len; // not the last one
        const end = std.math.add(usize, start, new_len) catch return false;
        if (!self.reserve(end)) return false;
        self.top = end;
        return true;
    }

    fn remap(ctx: *anyopaque, memory: []u8, alignment: std.mem.Alignment, new_len: usize, ra: usize) ?[*]u8 {
        return if (resize(ctx, memory, alignment, new_len, ra)) memory.ptr else null;
    }

    fn free(ctx: *anyopaque, memory: []u8, _: std.mem.Alignment, _: usize) void {
        const self: *CallHeap = @ptrCast(@alignCast(ctx));
        if (@intFromPtr(memory.ptr) + memory.len == self.top) self.top = @intFromPtr(memory.ptr);
    }
};

/// Report `err` through `error_set` and return 1, the value `control_logic` should return:
/// the message of `fail` for `error.PluginFailed`, else the error's name.
pub fn reportError(err: anyerror) i32 {
    switch (err) {
        error.PluginFailed => setError(message),
        error.OutOfMemory => setError("out of memory"),
        else => setError(@errorName(err)),
    }
    return 1;
}

/// The whole input of this call (the JSON context), copied into `allocator`'s memory.
pub fn readInput(allocator: Allocator) Error![]u8 {
    const length = std.math.cast(usize, kernel.input_length()) orelse return error.OutOfMemory;
    const bytes = try allocator.alloc(u8, length);
    var i: usize = 0;
    while (i + 8 <= length) : (i += 8) {
        std.mem.writeInt(u64, bytes[i..][0..8], kernel.input_load_u64(i), .little);
    }
    while (i < length) : (i += 1) bytes[i] = kernel.input_load_u8(i);
    return bytes;
}

/// Make `bytes` the output of this call, verbatim. `run` does this with the commands; call it
/// yourself only when writing `control_logic` without `run`.
pub fn setOutput(bytes: []const u8) Error!void {
    const offset = toKernel(bytes) orelse return error.OutOfMemory;
    kernel.output_set(offset, bytes.len);
}

/// Set the error message of this call; `control_logic` should then return nonzero.
pub fn setError(text: []const u8) void {
    const offset = toKernel(text) orelse return;
    kernel.error_set(offset);
}

/// Copy `bytes` into a new block of Extism kernel memory and return its offset, the way Extism
/// host functions take their arguments (see `configGet`, or a host function of the daemon).
pub fn store(bytes: []const u8) Error!u64 {
    return toKernel(bytes) orelse error.OutOfMemory;
}

/// Copy `bytes` into a new block of kernel memory; null if the kernel is out of memory.
fn toKernel(bytes: []const u8) ?u64 {
    const offset = kernel.alloc(bytes.len);
    if (offset == 0 and bytes.len > 0) return null;
    var i: usize = 0;
    while (i + 8 <= bytes.len) : (i += 8) {
        kernel.store_u64(offset + i, std.mem.readInt(u64, bytes[i..][0..8], .little));
    }
    while (i < bytes.len) : (i += 1) kernel.store_u8(offset + i, bytes[i]);
    return offset;
}

// ---------------------------------------------------------------------------------------------
// The daemon's host functions
// ---------------------------------------------------------------------------------------------

/// Imported from "extism:host/user" only by a plugin that calls `log` or `history`.
const daemon = struct {
    extern "extism:host/user" fn pi_log(level: u64, message: u64) void; // (i64, i64) -> ()
    extern "extism:host/user" fn pi_history(sensor_id: u64, count: u64) u64; // (i64, i64) -> i64
};

pub const LogLevel = enum(u64) { debug = 0, info = 1, warning = 2, @"error" = 3 };

/// One line in the daemon's log (a `plugin_log` event with this plugin's name and the tick),
/// formatted into 512 bytes at most. The daemon rate-limits each plugin's lines (5 a second,
/// bursts of 20, by default) and counts what it drops. For fields of your own, log a JSON
/// object: `pdk.log(.info, "{{\"message\":\"heating\",\"error_c\":{d}}}", .{err})`.
pub fn log(level: LogLevel, comptime fmt: []const u8, args: anytype) void {
    var buffer: [512]u8 = undefined;
    var writer: std.Io.Writer = .fixed(&buffer);
    writer.print(fmt, args) catch {};
    const offset = toKernel(writer.buffered()) orelse return;
    daemon.pi_log(@intFromEnum(level), offset);
    kernel.free(offset);
}

/// One past reading of a sensor: Unix seconds and the value.
pub const Sample = struct { timestamp: f64, value: f64 };

/// Up to `count` most recent valid readings of `sensor_id`, oldest first, in `allocator`'s
/// memory; the current tick's reading is the last. Null when the daemon refuses: a sensor it
/// does not know or has not granted to this plugin, or more reads in one call than it allows
/// (8 by default). The daemon keeps the last 600 readings of each sensor by default.
pub fn history(allocator: Allocator, sensor_id: []const u8, count: u32) Error!?[]Sample {
    const key = try store(sensor_id);
    defer kernel.free(key);
    const text = try fromKernelOrNull(allocator, daemon.pi_history(key, count)) orelse return null;
    const pairs = std.json.parseFromSliceLeaky([]const [2]f64, allocator, text, .{}) catch |err| switch (err) {
        error.OutOfMemory => return error.OutOfMemory,
        else => return fail("history of '{s}' is not a list of pairs: {s}", .{ sensor_id, @errorName(err) }),
    };
    const samples = try allocator.alloc(Sample, pairs.len);
    for (pairs, samples) |pair, *sample| sample.* = .{ .timestamp = pair[0], .value = pair[1] };
    return samples;
}

/// The mean value of `sensor_id` over its last `count` readings; null when there are none.
pub fn historyMean(allocator: Allocator, sensor_id: []const u8, count: u32) Error!?f64 {
    const samples = try history(allocator, sensor_id, count) orelse return null;
    if (samples.len == 0) return null;
    var sum: f64 = 0;
    for (samples) |s| sum += s.value;
    return sum / @as(f64, @floatFromInt(samples.len));
}

// ---------------------------------------------------------------------------------------------
// Extism config and vars
// ---------------------------------------------------------------------------------------------

/// The Extism config value `key` (the plugin's config map as the daemon hands it to Extism: strings
/// as they are, other values as their JSON text), copied into `allocator`; null when absent.
/// `Context.config` has the same map as JSON, parsed.
pub fn configGet(allocator: Allocator, key: []const u8) Error!?[]u8 {
    return fromKernelOrNull(allocator, kernel.config_get(try store(key)));
}

/// The var `key` of this instance, copied into `allocator`; null when unset. Vars persist from
/// call to call of one instance, within the daemon's `max_var_bytes` for all of them together;
/// they start empty when the plugin is (re)loaded, and after a call that trapped, timed out or
/// ran out of fuel or memory (the daemon then builds a fresh instance).
pub fn varGet(allocator: Allocator, key: []const u8) Error!?[]u8 {
    return fromKernelOrNull(allocator, kernel.var_get(try store(key)));
}

/// Set the var `key` to `value`. Past `max_var_bytes` the call fails (an Extism error).
pub fn varSet(key: []const u8, value: []const u8) Error!void {
    kernel.var_set(try store(key), try store(value));
}

/// This instance's calls so far, this one included (1 at its first), counted in the var `key`: a
/// call that returned an error keeps the count; a fresh instance (see `varGet`) starts it over.
pub fn countCall(key: []const u8) Error!u64 {
    const previous = try varGet(callAllocator(), key);
    const calls: u64 = if (previous) |text| (std.fmt.parseInt(u64, text, 10) catch 0) + 1 else 1;
    var buffer: [20]u8 = undefined;
    try varSet(key, std.fmt.bufPrint(&buffer, "{d}", .{calls}) catch unreachable);
    return calls;
}

fn fromKernelOrNull(allocator: Allocator, offset: u64) Error!?[]u8 {
    if (offset == 0) return null;
    defer kernel.free(offset);
    const length = std.math.cast(usize, kernel.length(offset)) orelse return error.OutOfMemory;
    const bytes = try allocator.alloc(u8, length);
    var i: usize = 0;
    while (i + 8 <= length) : (i += 8) {
        std.mem.writeInt(u64, bytes[i..][0..8], kernel.load_u64(offset + i), .little);
    }
    while (i < length) : (i += 1) bytes[i] = kernel.load_u8(offset + i);
    return bytes;
}
