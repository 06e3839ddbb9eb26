// Live fork-to-many: N children of a running sandbox in one call, the source paused
// only while the pages it wrote are copied. A child's RAM is a private mapping of a
// staged memory image; what it wrote since its restore are exactly its anonymous
// pages. The capture copies those (native helper), saves the device state without
// RAM (QEMU's xen-save-devices-state) and resumes the source; the new children map
// the same staged image and load those pages from their device-state stream. No
// whole-RAM migration and no materialising QEMU stand between the call and the
// children. The capture is registered as an ordinary snapshot (a diff layer) after
// the children answered, off their path.
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { shmDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { validateName } from "../common/validate.js";
import type { AgentClient } from "../guest/agent-client.js";
import { type ForkChildResult, forkSandboxes, validateForkCount } from "../sandbox/fork.js";
import { getSandbox } from "../sandbox/lifecycle.js";
import { ancestorsOf, MAX_CHAIN_DEPTH } from "../store/chains.js";
import { applyDiffLayer } from "../store/layers.js";
import { getSnapshot, registerSnapshot, type SnapshotInfo, snapshotWorkDirs } from "../store/snapshots.js";
import { holdStaged, stageKey } from "../store/staging.js";
import { branches } from "../store/state.js";
import { type GuestRam, guestRamOf, startPageCapture } from "../vmm/capture-pages.js";
import { runtimePaths } from "../vmm/plan.js";
import { eventTimeMs, QmpClient, type QmpEvent } from "../vmm/qmp.js";
import { deviceSplice, RAM_BLOCK, ramSectionId, spliceDevices } from "./vmstate.js";

export type LiveForkOpts = {
  n: number;
  /** The snapshot the capture is registered as; default SOURCE_TAG-live-BASE36. */
  tag?: string;
  ttlMs?: number;
  metadata?: Record<string, string>;
  concurrency?: number;
  keepAgent?: (id: string, agent: AgentClient) => void;
  onChild?: (result: ForkChildResult) => void;
};

export type LiveFork = {
  tag: string;
  sourceId: string;
  /** The source's pause, QEMU's STOP to RESUME. */
  pauseMs: number;
  /** From the call until the capture could be forked from. */
  captureReadyMs: number;
  /** When it could (performance.now()), for callers timing from earlier than the call. */
  captureReadyAt: number;
  capturedPages: number;
  children: ForkChildResult[];
  /** Register the capture as snapshot `tag` (a diff layer on the source's image); call once the children are up. */
  register: () => Promise<SnapshotInfo>;
  /** Drop the capture instead (the children failed and were killed). */
  discard: () => Promise<void>;
};

/**
 * The snapshot whose staged image the source maps. Not always the source's own tag:
 * a child of a live fork maps its grandparent's image (its own capture's pages were
 * loaded into its private memory), so the image is identified by the mapping.
 */
async function mappedSnapshot(pid: number, memoryMib: number): Promise<{ snapshot: SnapshotInfo; image: string; ram: GuestRam }> {
  const ram = guestRamOf(pid, memoryMib);
  const key = path.basename(path.dirname(ram.path));
  const tag = key.split("@")[0] ?? "";
  const snapshot = await getSnapshot(tag).catch(() => undefined);
  const stat = await fsp.stat(ram.path).catch(() => undefined);
  if (
    ram.deleted ||
    !snapshot ||
    stageKey(snapshot) !== key ||
    path.dirname(path.dirname(ram.path)) !== path.join(shmDir(), "images") ||
    stat?.ino !== ram.inode
  ) {
    throw new ForkdError(
      "not_supported",
      `the memory image this sandbox maps (${ram.path}${ram.deleted ? ", since replaced" : ""}) is not a staged snapshot image any more; BRANCH it instead (forkd branch)`,
    );
  }
  return { snapshot, image: ram.path, ram };
}

export async function forkLive(sourceId: string, opts: LiveForkOpts): Promise<LiveFork> {
  const started = performance.now();
  const n = validateForkCount(opts.n);
  const row = getSandbox(sourceId);
  if (!row.tag) throw new ForkdError("bad_request", `sandbox ${sourceId} was not forked from a snapshot, so it cannot be forked live`);
  const tag = validateName(opts.tag ?? `${row.tag}-live-${Date.now().toString(36)}`, "tag");
  if (await getSnapshot(tag).catch(() => undefined)) {
    throw new ForkdError("conflict", `snapshot ${tag} already exists; pick another tag`, { tag });
  }
  const { snapshot: base, image, ram } = await mappedSnapshot(row.pid, row.memory_mib);
  const claimed = branches.claim({
    tag,
    source_id: sourceId,
    mode: "live",
    status: "writing",
    error: null,
    pause_ms: null,
    total_ms: null,
    owner_pid: process.pid,
    created_at: new Date().toISOString(),
  });
  if (!claimed) throw new ForkdError("conflict", `snapshot ${tag} already exists or is being written; pick another tag`, { tag });
  const unhold = holdStaged(stageKey(base));
  const { work, stageWork } = await snapshotWorkDirs();
  const out = {
    vmstate: path.join(stageWork, "capture.vmstate"),
    layer: path.join(stageWork, "capture.layer"),
    pagemap: path.join(stageWork, "capture.pagemap"),
  };
  const devicesPath = path.join(row.run_dir, `capture-${randomBytes(4).toString("hex")}.devices`);
  let released = false;
  const release = async (failed?: string) => {
    if (released) return;
    released = true;
    unhold();
    await fsp.rm(devicesPath, { force: true });
    if (failed !== undefined) {
      branches.finish(tag, { status: "failed", error: failed });
      await fsp.rm(work, { recursive: true, force: true });
      await fsp.rm(stageWork, { recursive: true, force: true });
    }
  };
  let pauseMs: number;
  let capturedPages: number;
  try {
    const prefix = await fsp.readFile(base.vmstatePath);
    const ramSection = ramSectionId(prefix, base.memoryMib * 2 ** 20);
    const capture = await startPageCapture({
      pid: row.pid,
      ram,
      block: RAM_BLOCK,
      ramSectionId: ramSection,
      prefixPath: base.vmstatePath,
      out,
    });
    try {
      ({ pauseMs, capturedPages } = await pauseAndCopy(row.run_dir, tag, devicesPath, capture));
      const devices = await fsp.readFile(devicesPath);
      const plain = spliceDevices(prefix, devices);
      // The children's stream: the snapshot's start, the written pages, the source's devices.
      await capture.finish(devicesPath, deviceSplice(prefix, devices));
      // The durable snapshot's stream has no pages (its memory image holds them).
      await fsp.writeFile(path.join(work, "vmstate.bin"), plain, { mode: 0o600 });
    } finally {
      capture.kill();
    }
  } catch (err) {
    await release((err as Error).message);
    throw err;
  }
  branches.setPause(tag, pauseMs);
  const captureReadyAt = performance.now();
  const captureReadyMs = captureReadyAt - started;
  let children: ForkChildResult[];
  try {
    children = await forkSandboxes({
      tag,
      n,
      from: { snapshot: { ...base, tag, vmstatePath: out.vmstate, parent: base.tag, branchedFrom: sourceId }, memoryPath: image },
      ...(opts.ttlMs !== undefined ? { ttlMs: opts.ttlMs } : {}),
      ...(opts.metadata ? { metadata: opts.metadata } : {}),
      ...(opts.concurrency !== undefined ? { concurrency: opts.concurrency } : {}),
      ...(opts.keepAgent ? { keepAgent: opts.keepAgent } : {}),
      ...(opts.onChild ? { onChild: opts.onChild } : {}),
    });
  } catch (err) {
    await release((err as Error).message);
    throw err;
  }
  const register = async (): Promise<SnapshotInfo> => {
    try {
      const memory = path.join(stageWork, "memory.bin");
      await fsp.copyFile(image, memory, fs.constants.COPYFILE_FICLONE);
      await fsp.chmod(memory, 0o600);
      await applyDiffLayer(memory, out.layer, out.pagemap);
      for (const f of Object.values(out)) await fsp.rm(f, { force: true });
      // Stored as the pages that differ from the image the source maps, unless that chain is at its limit.
      const depth = (await ancestorsOf(base)).length + 1;
      const info = await registerSnapshot({
        work,
        stageWork,
        ...(depth < MAX_CHAIN_DEPTH ? { diffFrom: { memorySha256: base.memorySha256, stagedPath: image } } : {}),
        base: {
          tag,
          image: base.image,
          kernelVersion: base.kernelVersion,
          accel: base.accel,
          vcpus: base.vcpus,
          memoryMib: base.memoryMib,
          network: base.network,
          ...(base.machine ? { machine: base.machine } : {}),
          warm: base.warm,
          parent: base.tag,
          branchedFrom: sourceId,
          branch: { mode: "live", pauseMs, captureMs: captureReadyMs },
          timings: { bootMs: 0, warmMs: 0, saveMs: captureReadyMs, totalMs: performance.now() - started },
        },
      });
      branches.finish(tag, { status: "ready", total_ms: performance.now() - started });
      await release();
      return info;
    } catch (err) {
      await release((err as Error).message);
      throw err;
    }
  };
  return {
    tag,
    sourceId,
    pauseMs,
    captureReadyMs,
    captureReadyAt,
    capturedPages,
    children,
    register,
    discard: async () => {
      await release("discarded: its children could not be restored");
      branches.remove(tag);
    },
  };
}

/**
 * Stop the source, copy its written pages, save its devices, resume it. The pause
 * is QEMU's own STOP→RESUME; whatever fails, the source runs again.
 */
async function pauseAndCopy(
  runDir: string,
  tag: string,
  devicesPath: string,
  capture: Awaited<ReturnType<typeof startPageCapture>>,
): Promise<{ pauseMs: number; capturedPages: number }> {
  const qmp = await QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 10_000 });
  const events: QmpEvent[] = [];
  qmp.on("event", (e) => events.push(e));
  let stopped = false;
  try {
    branches.setSourcePaused(tag, true);
    await qmp.execute("stop", {});
    stopped = true;
    // Both while it is stopped, side by side: the helper reads guest RAM, QEMU writes device state.
    const [capturedPages] = await Promise.all([
      capture.copy(),
      qmp.execute("xen-save-devices-state", { filename: devicesPath, live: false }),
    ]);
    await qmp.execute("cont", {});
    stopped = false;
    branches.setSourcePaused(tag, false);
    const stop = events.find((e) => e.event === "STOP");
    const resume =
      events.find((e) => e.event === "RESUME") ?? (await qmp.waitForEvent("RESUME", { timeoutMs: 2000 }).catch(() => undefined));
    const pauseMs = stop && resume ? eventTimeMs(resume) - eventTimeMs(stop) : Number.NaN;
    return { pauseMs, capturedPages };
  } finally {
    if (stopped) {
      await qmp.execute("cont", {}).catch(() => {});
      branches.setSourcePaused(tag, false);
    }
    qmp.close();
  }
}
