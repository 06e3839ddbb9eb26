// Checks of request values the schemas cannot express, each a 400 naming the field.
// Every timeout has a documented range: unbounded, a timer past 2^31 ms fires at
// once (setTimeout wraps) and a call could hold the daemon's resources forever.
import { ForkdError } from "@forkd/core";
import { TIMEOUT_RANGES, type TimeoutKind } from "./schemas.js";

/** The value, checked: a whole number in its range, or a 400 naming the field and the range. */
export function boundedTimeout(value: number | undefined, field: string, kind: TimeoutKind): number | undefined {
  if (value === undefined) return undefined;
  const r = TIMEOUT_RANGES[kind];
  if (!Number.isInteger(value) || value < r.min || value > r.max) {
    throw new ForkdError("bad_request", `${field} must be a whole number of ${r.unit} from ${r.min} to ${r.max}, got ${value}`, {
      field,
      min: r.min,
      max: r.max,
      unit: r.unit,
    });
  }
  return value;
}

/**
 * No NUL byte in what becomes a program, an argument, an environment entry or a
 * directory in the guest: the kernel's strings end there, so the guest could
 * never run what was asked (and would fail it as its own error, not the caller's).
 */
export function noNulBytes(values: Record<string, string | string[] | Record<string, string> | undefined>): void {
  for (const [field, value] of Object.entries(values)) {
    if (value === undefined) continue;
    const strings = typeof value === "string" ? [value] : Array.isArray(value) ? value : Object.entries(value).flat();
    if (strings.some((s) => s.includes("\0"))) {
      throw new ForkdError("bad_request", `${field} must not contain NUL bytes (\\0)`, { field });
    }
  }
}
