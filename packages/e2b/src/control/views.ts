// E2B's JSON for a sandbox (the SDK reads these field names and nothing else).
import { ENVD_VERSION } from "../envd/version.js";
import { type E2bSandboxRecord, stateOf } from "../sandboxes.js";

/** forkd's disks are copy-on-write of the snapshot's; E2B's field wants a number. */
const DISK_SIZE_MB = 0;

/** What create, connect and fork answer with (E2B's `Sandbox`). */
export function sandboxCreatedView(r: E2bSandboxRecord) {
  return {
    sandboxID: r.sandboxID,
    templateID: r.templateID,
    ...(r.alias ? { alias: r.alias } : {}),
    clientID: r.clientID,
    envdVersion: ENVD_VERSION,
    // None for a sandbox created with secure: false (then envd asks for no token).
    envdAccessToken: r.envdAccessToken || null,
    trafficAccessToken: null,
    domain: null,
  };
}

/** GET /v2/sandboxes (E2B's `ListedSandbox`). */
export function sandboxListedView(r: E2bSandboxRecord) {
  return {
    sandboxID: r.sandboxID,
    templateID: r.templateID,
    ...(r.alias ? { alias: r.alias } : {}),
    clientID: r.clientID,
    startedAt: new Date(r.startedAtMs).toISOString(),
    endAt: new Date(r.endAtMs).toISOString(),
    cpuCount: r.cpuCount,
    memoryMB: r.memoryMB,
    diskSizeMB: DISK_SIZE_MB,
    metadata: r.metadata,
    state: stateOf(r),
    envdVersion: ENVD_VERSION,
    volumeMounts: [],
  };
}

/** GET /sandboxes/:id (E2B's `SandboxDetail`). */
export function sandboxDetailView(r: E2bSandboxRecord) {
  return {
    ...sandboxListedView(r),
    envdAccessToken: r.envdAccessToken || null,
    domain: null,
    allowInternetAccess: r.allowInternetAccess,
    network: { allowOut: r.allowOut, denyOut: r.denyOut },
    lifecycle: { onTimeout: r.autoPause ? "pause" : "kill", autoResume: false },
    /** forkd's own: the sandbox under it now (changes on resume), for forkd's /v1 API and CLI. */
    forkdSandboxID: r.forkdId,
  };
}
