// Every timeout a request may carry has a documented range; outside it the request
// is a 400. Unbounded, a timer past 2^31 ms fires at once (setTimeout wraps) and a
// call could hold the daemon's resources forever.
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
