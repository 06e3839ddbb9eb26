// A started child as the CLI reports it, the same for both backends: the daemon
// answers with core's restoredChildView, the direct backend maps with core's
// childTimingsView, and this row is made from either.
import type { ApiChildTimings } from "@forkd/core";
import type { ForkRow } from "./backend-types.js";

export function forkRowOf(c: { id: string; timings?: ApiChildTimings }): ForkRow {
  return {
    id: c.id,
    ok: true,
    ...(c.timings
      ? {
          vmm_start_ms: c.timings.vmm_start_ms,
          restore_ms: c.timings.restore_ms,
          first_answer_ms: c.timings.first_answer_ms,
          total_ms: c.timings.total_ms,
        }
      : {}),
  };
}
