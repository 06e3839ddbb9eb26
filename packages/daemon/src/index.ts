export { describeCall } from "./audit.js";
export * from "./auth.js";
export * from "./daemon.js";
export { REMEDIATION } from "./http-errors.js";
export { confinedPackPath, refuseSymlinkedComponents } from "./pack-paths.js";
export { boundedTimeout } from "./request-checks.js";
export * as schemas from "./schemas.js";
export { buildServer, type ServerContext } from "./server.js";
