// @forkd/e2b: E2B's control plane and envd plane on the daemon's port.
export { e2bApiKey } from "./api-key.js";
export { E2bContext } from "./context.js";
export { startE2bTimeLimits } from "./control/lifecycle.js";
export { parseGuestProbe } from "./control/metrics.js";
export { e2bErrorOf, sendE2bError } from "./errors.js";
export { e2bCredentialVerdict, isE2bRequest, registerE2bPlanes } from "./planes.js";
