// The E2B lifecycle on forkd's concepts: create = fork from the template's
// snapshot, pause = BRANCH (memory, devices and disk captured) then kill, resume =
// fork from that capture, kill = kill plus the captures only this sandbox used.
import { forkAllOrNothing, forkLiveAllOrNothing, isForkdError, killSandbox, listSandboxes, removeSnapshot, startBranch } from "@forkd/core";
import type { E2bContext } from "../context.js";
import { E2bHttpError } from "../errors.js";
import { type E2bSandboxRecord, newAccessToken, newE2bSandboxId } from "../sandboxes.js";
import { templateSnapshot } from "./templates.js";

/** The time limit when the body names none: E2B's documented default, 5 minutes (the JS SDK 2.x leaves it to the server). */
export const DEFAULT_TIMEOUT_S = 300;
/** E2B's ceiling for a sandbox's time limit (its Pro tier): 24 hours. */
export const MAX_TIMEOUT_S = 24 * 3600;
/** Reported as E2B's clientID: one machine, one client. */
const CLIENT_ID = "forkd";

export type CreateOpts = {
  templateID: string;
  timeoutS: number;
  metadata: Record<string, string>;
  envVars: Record<string, string>;
  allowInternetAccess: boolean;
  allowOut: string[];
  denyOut: string[];
  autoPause: boolean;
  /** E2B's `secure` (the Python SDK sends it; the JS SDK 2.x never does): false gives no access token, so envd is open to anyone reaching the port. */
  secure: boolean;
};

export async function createE2bSandbox(e2b: E2bContext, opts: CreateOpts): Promise<E2bSandboxRecord> {
  const { snapshot, alias } = await templateSnapshot(e2b, opts.templateID);
  const [child] = await forkAllOrNothing({
    tag: snapshot.tag,
    n: 1,
    network: opts.allowInternetAccess || opts.allowOut.length > 0,
    ...(opts.allowOut.length ? { allowOut: opts.allowOut } : {}),
    ...(opts.denyOut.length ? { denyOut: opts.denyOut } : {}),
    ...e2b.deps.forkSteps(() => {}),
  });
  if (!child) throw new E2bHttpError(500, "the fork returned no sandbox");
  const now = Date.now();
  const record: E2bSandboxRecord = {
    sandboxID: newE2bSandboxId(),
    templateID: snapshot.tag,
    alias,
    clientID: CLIENT_ID,
    forkdId: child.id,
    pausedTag: null,
    ownedTags: [],
    envdAccessToken: opts.secure ? newAccessToken() : "",
    envVars: opts.envVars,
    metadata: opts.metadata,
    startedAtMs: now,
    endAtMs: now + opts.timeoutS * 1000,
    autoPause: opts.autoPause,
    cpuCount: snapshot.vcpus,
    memoryMB: snapshot.memoryMib,
    allowInternetAccess: opts.allowInternetAccess,
    allowOut: opts.allowOut,
    denyOut: opts.denyOut,
  };
  try {
    await e2b.sandboxes.put(record);
  } catch (err) {
    await killForkd(e2b, child.id);
    throw err;
  }
  return record;
}

async function killForkd(e2b: E2bContext, forkdId: string): Promise<void> {
  e2b.agents.drop(forkdId);
  try {
    await killSandbox(forkdId);
  } catch (err) {
    if (!isForkdError(err) || err.code !== "sandbox_not_found") throw err;
  }
}

/** Kill it (running or paused) and remove the captures no one else still uses. */
export async function killE2bSandbox(e2b: E2bContext, sandboxID: string): Promise<void> {
  await e2b.sandboxes.exclusive(sandboxID, async () => {
    const record = e2b.sandboxes.require(sandboxID);
    e2b.sandboxes.gone(sandboxID, "killed");
    if (record.forkdId) await killForkd(e2b, record.forkdId);
    e2b.sandboxes.remove(sandboxID);
    await removeOwnedTags(e2b, [...record.ownedTags, ...(record.pausedTag ? [record.pausedTag] : [])]);
  });
}

/** Newest first; a capture another sandbox still runs from (a fork's sibling) stays for its last user. */
async function removeOwnedTags(e2b: E2bContext, tags: string[]): Promise<void> {
  for (const tag of [...tags].reverse()) {
    try {
      // Never forced: a capture a sibling still runs from (conflict) stays for its last user.
      await removeSnapshot(tag);
    } catch (err) {
      if (isForkdError(err) && (err.code === "conflict" || err.code === "snapshot_not_found")) continue;
      e2b.log(`removing snapshot ${tag} failed: ${(err as Error).message}`);
    }
  }
}

/** Pause: the whole VM captured (processes survive the resume), then stopped. False when already paused. */
export async function pauseE2bSandbox(e2b: E2bContext, sandboxID: string): Promise<boolean> {
  return e2b.sandboxes.exclusive(sandboxID, async () => {
    const record = e2b.sandboxes.require(sandboxID);
    if (!record.forkdId) return false;
    const tag = `e2b-${sandboxID.slice(0, 40)}-p${Date.now().toString(36)}`;
    const started = await startBranch(record.forkdId, { tag });
    const done = await started.done;
    if (done.status !== "ready") throw new E2bHttpError(500, `pausing sandbox ${sandboxID} failed: ${done.error ?? "unknown"}`);
    e2b.sandboxes.gone(sandboxID, "paused");
    await killForkd(e2b, record.forkdId);
    await e2b.sandboxes.update(sandboxID, {
      forkdId: null,
      pausedTag: tag,
      ownedTags: record.pausedTag ? [...record.ownedTags, record.pausedTag] : record.ownedTags,
    });
    return true;
  });
}

/**
 * Resume a paused sandbox from its capture (201), or keep a running one (200). Either
 * way the time limit only grows: E2B's connect never shortens it.
 */
export async function connectE2bSandbox(
  e2b: E2bContext,
  sandboxID: string,
  timeoutS: number | undefined,
): Promise<{ record: E2bSandboxRecord; resumed: boolean }> {
  return e2b.sandboxes.exclusive(sandboxID, async () => {
    const record = e2b.sandboxes.require(sandboxID);
    const endAtMs = Math.max(record.endAtMs, Date.now() + (timeoutS ?? DEFAULT_TIMEOUT_S) * 1000);
    if (record.forkdId) return { record: await e2b.sandboxes.update(sandboxID, { endAtMs }), resumed: false };
    if (!record.pausedTag) throw new E2bHttpError(500, `sandbox ${sandboxID} is paused without a capture`);
    const [child] = await forkAllOrNothing({
      tag: record.pausedTag,
      n: 1,
      network: record.allowInternetAccess || record.allowOut.length > 0,
      ...(record.allowOut.length ? { allowOut: record.allowOut } : {}),
      ...(record.denyOut.length ? { denyOut: record.denyOut } : {}),
      ...e2b.deps.forkSteps(() => {}),
    });
    if (!child) throw new E2bHttpError(500, "the resume returned no sandbox");
    return { record: await e2b.sandboxes.update(sandboxID, { forkdId: child.id, endAtMs }), resumed: true };
  });
}

/**
 * E2B's fork {count}: forkd's live fork-to-many (the source paused only while the
 * pages it wrote are copied; children restored from that capture), all or nothing.
 * Each child is a new E2B sandbox with the source's template, metadata and envVars.
 */
export async function forkE2bSandbox(
  e2b: E2bContext,
  sandboxID: string,
  count: number,
  timeoutS: number | undefined,
): Promise<E2bSandboxRecord[]> {
  return e2b.sandboxes.exclusive(sandboxID, async () => {
    const source = e2b.sandboxes.require(sandboxID);
    if (!source.forkdId) throw new E2bHttpError(409, `sandbox ${sandboxID} is paused; connect to it (resume) before forking`);
    const live = await forkLiveAllOrNothing(source.forkdId, { n: count, concurrency: 4, ...e2b.deps.forkSteps(() => {}) });
    // The durable snapshot is written after the answer, off the children's path (as forkd's own fork route does).
    live.register().catch((err: Error) => e2b.log(`registering the fork capture ${live.tag} failed: ${err.message}`));
    const now = Date.now();
    const children = live.children.map(
      (child): E2bSandboxRecord => ({
        ...source,
        sandboxID: newE2bSandboxId(),
        forkdId: child.id,
        pausedTag: null,
        // The capture goes with the last of its children.
        ownedTags: [live.tag],
        envdAccessToken: newAccessToken(),
        startedAtMs: now,
        endAtMs: now + (timeoutS ?? DEFAULT_TIMEOUT_S) * 1000,
      }),
    );
    for (const child of children) await e2b.sandboxes.put(child);
    return children;
  });
}

/** E2B's refresh (keep-alive, the Python SDK's): the limit becomes at least now + duration, never shorter. */
export async function refreshE2bSandbox(e2b: E2bContext, sandboxID: string, durationS: number): Promise<void> {
  await e2b.sandboxes.exclusive(sandboxID, async () => {
    const record = e2b.sandboxes.require(sandboxID);
    await e2b.sandboxes.update(sandboxID, { endAtMs: Math.max(record.endAtMs, Date.now() + durationS * 1000) });
  });
}

/** E2B's setTimeout overwrites the limit (it may shorten it). */
export async function setE2bTimeout(e2b: E2bContext, sandboxID: string, timeoutS: number): Promise<void> {
  await e2b.sandboxes.exclusive(sandboxID, async () => {
    e2b.sandboxes.require(sandboxID);
    await e2b.sandboxes.update(sandboxID, { endAtMs: Date.now() + timeoutS * 1000 });
  });
}

/**
 * Once a second: a running sandbox past its time limit is killed (or paused, with
 * autoPause); one whose VM died under it (killed through forkd's own API, crashed)
 * is dropped. Paused sandboxes keep no time limit, as on E2B.
 */
async function reapE2bSandboxes(e2b: E2bContext, nowMs = Date.now()): Promise<void> {
  const alive = new Set(
    listSandboxes()
      .filter((s) => s.alive)
      .map((s) => s.id),
  );
  for (const record of e2b.sandboxes.list()) {
    if (!record.forkdId) continue;
    try {
      if (!alive.has(record.forkdId)) {
        await e2b.sandboxes.exclusive(record.sandboxID, async () => {
          const now = e2b.sandboxes.get(record.sandboxID);
          if (!now?.forkdId || now.forkdId !== record.forkdId) return;
          if (listSandboxes().some((s) => s.id === now.forkdId && s.alive)) return;
          e2b.sandboxes.remove(now.sandboxID);
          await removeOwnedTags(e2b, [...now.ownedTags, ...(now.pausedTag ? [now.pausedTag] : [])]);
        });
      } else if (record.endAtMs <= nowMs) {
        if (record.autoPause) await pauseE2bSandbox(e2b, record.sandboxID);
        else await killE2bSandbox(e2b, record.sandboxID);
        e2b.log(`sandbox ${record.sandboxID} reached its time limit: ${record.autoPause ? "paused" : "killed"}`);
      }
    } catch (err) {
      e2b.log(`time limit of ${record.sandboxID}: ${(err as Error).message}`);
    }
  }
}

/** At daemon start: load what a previous daemon left, then enforce time limits once a second. Returns the stop. */
export function startE2bTimeLimits(e2b: E2bContext): () => void {
  const records = e2b.sandboxes.load();
  if (records.length) e2b.log(`${records.length} sandbox record(s) kept from before the restart`);
  let running = false;
  const reaper = setInterval(() => {
    if (running) return;
    running = true;
    reapE2bSandboxes(e2b)
      .catch((err: Error) => e2b.log(`reaper: ${err.message}`))
      .finally(() => {
        running = false;
      });
  }, 1000);
  reaper.unref();
  return () => clearInterval(reaper);
}
