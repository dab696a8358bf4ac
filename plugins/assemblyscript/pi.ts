// pi-controller's helper for plugins in AssemblyScript, on the upstream Extism PDK (@extism/as-pdk).
//
// All Extism I/O goes through the upstream PDK (Host, Config, Var); this file adds our contract: a
// context to read sensor values from, commands to write back, and the daemon's host functions. A
// plugin:
//
//   import { Context, Commands, run } from "pi-controller/pi";   // this file, wherever the plugin lies
//
//   export function control_logic(): i32 {
//     return run((ctx: Context, out: Commands): void => {
//       const lux = ctx.value("light_sensor");          // NaN: missing or invalid, so no command
//       if (lux > ctx.configNumber("bright_lux", 500)) out.setLow("led_strip");
//     });
//   }
//
// Build with `python -m pi_controller.plugins.build` (see docs/plugins.md). The context is read with
// a small scanner, not a JSON parser: it relies on the daemon's compact encoding (no spaces), which
// the contract fixes. Output is written as UTF-8 bytes: the PDK's Host.outputString sizes its block
// by string.length (UTF-16 units), which cuts short any output with a non-ASCII character.

import { Config, Host, Memory } from "@extism/as-pdk";
import { error_set, length } from "@extism/as-pdk/lib/env";

// ---------------------------------------------------------------------------------------------
// The daemon's host functions (import module "extism:host/user"): imported only when used.

@external("extism:host/user", "pi_log")
declare function pi_log(level: u64, message: u64): void;
@external("extism:host/user", "pi_history")
declare function pi_history(sensor_id: u64, count: u64): u64;

export enum Level { Debug = 0, Info = 1, Warning = 2, Error = 3 }

// One line in the daemon's log, with this plugin's name and the tick; rate limited by the daemon.
export function log(level: Level, message: string): void {
  const block = Memory.allocateString(message);
  pi_log(<u64>level, block.offset);
  block.free();
}

// The mean of a sensor's last `count` valid readings, from the daemon's history; NaN when the
// daemon refuses (sensor unknown or not granted) or has none.
export function historyMean(sensorId: string, count: u32): f64 {
  const key = Memory.allocateString(sensorId);
  const offset = pi_history(key.offset, count);
  key.free();
  if (offset == 0) return NaN;
  const block = new Memory(offset, length(offset));
  const text = block.toString();
  block.free();
  return meanOfPairs(text);
}

// ---------------------------------------------------------------------------------------------
// The context

export class Context {
  constructor(public json: string) {}

  // The value of `sensorId` when its reading is in the context and valid; NaN otherwise.
  value(sensorId: string): f64 {
    const start = this.json.indexOf('"sensor_id":' + quote(sensorId));
    if (start < 0) return NaN;
    const end = this.json.indexOf("}", start);
    const reading = this.json.slice(start, end < 0 ? this.json.length : end);
    if (reading.indexOf('"valid":true') < 0) return NaN;
    return numberAfter(reading, '"value":');
  }

  // The context's `timestamp`: Unix seconds of this tick on the wall clock, for the time of day. It jumps
  // when the clock is set (NTP steps a Pi's clock after boot): never time anything with it.
  get timestamp(): f64 {
    return numberAfter(this.tail(), '"timestamp":');
  }

  // The context's `monotonic`: seconds of this tick on a clock that never jumps (only differences mean
  // anything), for timers, holds and rates. Use these two, never a clock of your own. NaN from a daemon
  // older than the field.
  get monotonic(): f64 {
    const tail = this.tail();
    const at = tail.indexOf(',"monotonic":');
    const tick = tail.indexOf(',"tick":');
    return at < 0 || (tick >= 0 && at > tick) ? NaN : numberAfter(tail.slice(at), '"monotonic":');
  }

  // The context's own keys, from its "timestamp" on ("timestamp":T,"monotonic":M,"tick":N,"config":...):
  // they follow the device states' closing brace, where no reading's "timestamp" can be; an actuator named
  // "timestamp" is followed by its state, not a number.
  private tail(): string {
    const key = '},"timestamp":';
    for (let at = this.json.indexOf(key); at >= 0; at = this.json.indexOf(key, at + 1)) {
      if (!isNaN(numberAfter(this.json.slice(at, at + key.length + 1), key))) return this.json.slice(at + 2);
    }
    return "";
  }

  // Config `key` as a number (through Extism config, where the daemon puts every config value,
  // numbers as their JSON text), or `fallback` when absent. A value that is no number fails the call.
  configNumber(key: string, fallback: f64): f64 {
    const text = Config.get(key);
    if (text === null) return fallback;
    const n = parseFloat(text);
    if (!isFinite(n)) throw new Error("config '" + key + "' must be a finite number, got " + text);
    return n;
  }

  // Config `key` as a string, or `fallback` when absent.
  configString(key: string, fallback: string): string {
    const text = Config.get(key);
    return text === null ? fallback : text;
  }
}

// ---------------------------------------------------------------------------------------------
// Commands

export class Commands {
  private items: string[] = [];

  setHigh(deviceId: string): void { this.add(deviceId, "set_high", "", 0); }
  setLow(deviceId: string): void { this.add(deviceId, "set_low", "", 0); }
  // A duty cycle in percent; the daemon rejects values outside 0..100, never clamps them.
  pwm(deviceId: string, dutyCycle: f64): void { this.add(deviceId, "pwm", "duty_cycle", dutyCycle); }
  setAngle(deviceId: string, angle: f64): void { this.add(deviceId, "set_angle", "angle", angle); }

  toJson(): string {
    return "[" + this.items.join(",") + "]";
  }

  private add(deviceId: string, action: string, parameter: string, amount: f64): void {
    if (!isFinite(amount)) throw new Error(action + " on '" + deviceId + "': amount must be finite");
    const parameters = parameter.length ? "{" + quote(parameter) + ":" + amount.toString() + "}" : "{}";
    this.items.push('{"device_id":' + quote(deviceId) + ',"action":' + quote(action) +
                    ',"parameters":' + parameters + "}");
  }
}

// ---------------------------------------------------------------------------------------------
// Running a call

// The whole of `control_logic`: read the context, call `step`, write the commands; 0 on success.
// An error thrown by `step` aborts the call with its message (see `abort`), and the daemon logs it.
export function run(step: (ctx: Context, out: Commands) => void): i32 {
  const out = new Commands();
  step(new Context(Host.inputString()), out);
  Host.output(Uint8Array.wrap(String.UTF8.encode(out.toJson())));
  return 0;
}

// AssemblyScript's abort (a failed assertion, a thrown error): report the message as the call's
// error, then trap. Plugins are built with `--use abort=.../pi/abort`.
export function abort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  const text = (message === null ? "abort" : message) + " at " +
               (fileName === null ? "?" : fileName) + ":" + line.toString() + ":" + column.toString();
  error_set(Memory.allocateString(text).offset);
  unreachable();
}

// ---------------------------------------------------------------------------------------------
// Scanning

function quote(text: string): string {
  return '"' + text.replaceAll("\\", "\\\\").replaceAll('"', '\\"') + '"';
}

function numberAfter(text: string, key: string): f64 {
  const at = text.indexOf(key);
  if (at < 0) return NaN;
  let end = at + key.length;
  while (end < text.length && "-+.eE0123456789".includes(text.charAt(end))) end++;
  return end > at + key.length ? parseFloat(text.slice(at + key.length, end)) : NaN;
}

// The mean of the second numbers of "[[t,v],[t,v],...]"; NaN for none.
function meanOfPairs(text: string): f64 {
  let sum: f64 = 0;
  let n = 0;
  let open = text.indexOf("[", 1);
  while (open >= 0) {
    const comma = text.indexOf(",", open);
    const close = text.indexOf("]", open);
    if (comma < 0 || close < 0 || comma > close) break;
    sum += parseFloat(text.slice(comma + 1, close));
    n++;
    open = text.indexOf("[", close);
  }
  return n > 0 ? sum / n : NaN;
}
