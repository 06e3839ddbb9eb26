export { type AuditCall, describeCall } from "./audit.js";
export * from "./auth.js";
export * from "./daemon.js";
export { REMEDIATION } from "./http-errors.js";
export { boundedTimeout } from "./request-checks.js";
export * as schemas from "./schemas.js";
export { BODY_LIMIT_BYTES, buildServer, FORKD_VERSION, type ServerContext } from "./server.js";
