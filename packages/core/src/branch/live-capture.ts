// The one way forkd captures a running sandbox live, for live BRANCH, workspace
// suspend and live fork-to-many. A sandbox's RAM is a private mapping of its
// snapshot's staged memory image, so what its guest wrote since the restore are
// exactly the mapping's anonymous pages. The source is stopped only while those
// pages are copied (vmm/capture-pages.ts, process_vm_readv) and its device state is
// saved without RAM; then it runs again. The capture is forkable at once (the
// staged image plus a device-state stream holding the written pages, offered to
// forks of its tag) and is registered as an ordinary snapshot, a diff layer on the
// image the source maps, off the caller's path. No userfaultfd, no whole-RAM
// migration: the pause is proportional to what the guest wrote, not its RAM size.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { shmDir } from "../common/config.js";
import { ForkdError } from "../common/errors.js";
import { faultPoint } from "../common/fault.js";
import { readVmmFile } from "../common/fsutil.js";
import { UndoStack, withTeardownFailures } from "../common/undo.js";
import { getSandbox } from "../sandbox/lifecycle.js";
import { type CaptureSource, offerCapture } from "../sandbox/offered-captures.js";
import { ancestorsOf, MAX_CHAIN_DEPTH, stageSnapshot } from "../store/chains.js";
import { applyDiffLayer } from "../store/layers.js";
import { getSnapshot, registerSnapshot, type SnapshotInfo, shmWorkDir, snapshotWorkDirs } from "../store/snapshots.js";
import { holdStaged, stageKey } from "../store/staging.js";
import { branches } from "../store/state.js";
import { findGuestRam, type GuestRam, type PageCapture, startPageCapture } from "../vmm/capture-pages.js";
import { runtimePaths } from "../vmm/plan.js";
import { eventTimeMs, QmpClient, type QmpEvent } from "../vmm/qmp.js";
import { deviceSplice, RAM_BLOCK, ramSectionId, spliceDevices } from "./vmstate.js";

/**
 * Can a sandbox whose guest RAM is mapped as `ram` be captured live, and from which
 * image (pure, for tests)? Only a private mapping of a staged snapshot image: then
 * every page the guest did not write is that snapshot's, byte for byte (staged
 * images are checked against the digest recorded at registration). An image evicted
 * or replaced since the restore is staged again from the durable store: same digest,
 * same bytes. Anything else (no such mapping, a file that is not a staged image, a
 * snapshot that is gone) is refused: its unwritten pages are not known anywhere.
 */
export type LiveCaptureVerdict = { ok: true; restage: boolean } | { ok: false; why: string };

export function judgeGuestRam(
  ram: GuestRam | undefined,
  opts: {
    memoryMib: number;
    imagesDir: string;
    /** The stage key of the snapshot the mapped file's directory names, if that snapshot exists. */
    snapshotKey: string | undefined;
    /** The inode at the mapped path now, if a file is there. */
    currentInode: number | undefined;
  },
): LiveCaptureVerdict {
  const diffInstead = "BRANCH it with mode diff or full, which copy its whole RAM";
  if (!ram) {
    return {
      ok: false,
      why: `its VMM has no single private ${opts.memoryMib} MiB mapping of a memory image (it was not restored from a staged snapshot); ${diffInstead}`,
    };
  }
  const key = path.basename(path.dirname(ram.path));
  if (path.dirname(path.dirname(ram.path)) !== opts.imagesDir) {
    return { ok: false, why: `its guest memory ${ram.path} is not a staged snapshot image; ${diffInstead}` };
  }
  if (opts.snapshotKey !== key) {
    return {
      ok: false,
      why: `the snapshot whose image it maps (${key}) is no longer registered, so its unwritten pages cannot be named; ${diffInstead}`,
    };
  }
  return { ok: true, restage: ram.deleted || opts.currentInode !== ram.inode };
}

/** A microvm's device state (no RAM) is tens of KiB; anything near this is not QEMU's. */
const MAX_DEVICE_STATE_BYTES = 64 * 1024 * 1024;

export type MappedImage = {
  /** The snapshot whose staged image the source maps (not always its own tag: a child of a live capture maps its grandparent's). */
  snapshot: SnapshotInfo;
  /** That image's staged path (staged again if it was evicted since). */
  image: string;
  ram: GuestRam;
};

function readMaps(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/maps`, "utf8");
  } catch (err) {
    throw new ForkdError("invalid_state", `cannot read the memory map of VMM ${pid}: ${(err as Error).message}`);
  }
}

async function inspectSource(sourceId: string): Promise<{ verdict: LiveCaptureVerdict; ram?: GuestRam; snapshot?: SnapshotInfo }> {
  const row = getSandbox(sourceId);
  const imagesDir = path.join(shmDir(), "images");
  const ram = findGuestRam(readMaps(row.pid), row.memory_mib, imagesDir);
  const tag = ram ? (path.basename(path.dirname(ram.path)).split("@")[0] ?? "") : "";
  const snapshot = tag ? await getSnapshot(tag).catch(() => undefined) : undefined;
  const currentInode = ram
    ? await fsp.stat(ram.path).then(
        (st) => st.ino,
        () => undefined,
      )
    : undefined;
  const verdict = judgeGuestRam(ram, {
    memoryMib: row.memory_mib,
    imagesDir,
    snapshotKey: snapshot ? stageKey(snapshot) : undefined,
    currentInode,
  });
  return { verdict, ...(ram ? { ram } : {}), ...(snapshot ? { snapshot } : {}) };
}

/** Whether a live capture of this sandbox is possible, and if not, why and what to do (for choosing a BRANCH mode). */
export async function liveCaptureSupport(sourceId: string): Promise<{ ok: true } | { ok: false; why: string }> {
  const { verdict } = await inspectSource(sourceId);
  return verdict.ok ? { ok: true } : verdict;
}

/** The image the source maps, staged again if it was evicted; refused (not_supported) when there is none. */
export async function mappedImage(sourceId: string): Promise<MappedImage> {
  const { verdict, ram, snapshot } = await inspectSource(sourceId);
  if (!verdict.ok) throw new ForkdError("invalid_state", `live capture of ${sourceId} is not possible: ${verdict.why}`, { id: sourceId });
  const image = verdict.restage ? await stageSnapshot(snapshot!) : ram!.path;
  if (image !== ram!.path) {
    throw new ForkdError("internal", `staging ${snapshot!.tag} again gave ${image}, not the path its sandbox maps (${ram!.path})`);
  }
  return { snapshot: snapshot!, image, ram: ram! };
}

export type LiveCapture = {
  tag: string;
  sourceId: string;
  /** The snapshot whose image the source maps: the capture is a layer on it. */
  base: SnapshotInfo;
  /** What children restore from until the capture is registered (forks of `tag` are offered it meanwhile). */
  from: CaptureSource;
  /** The source's pause, QEMU's STOP to RESUME. */
  pauseMs: number;
  /** When the capture could be forked from (performance.now()). */
  readyAt: number;
  capturedPages: number;
  /** Register the capture as snapshot `tag` (a diff layer on `base`'s image), then stop offering it. Once. */
  register: () => Promise<SnapshotInfo>;
  /** Drop the capture instead. */
  discard: () => Promise<void>;
};

/**
 * Capture `sourceId` as `tag`, which the caller has claimed in the branch registry.
 * Resolves once the source runs again and the capture is forkable; on failure the
 * source runs again and nothing of the capture is left.
 */
export async function captureLive(sourceId: string, tag: string, opts: { startedAt: number; source?: MappedImage }): Promise<LiveCapture> {
  const row = getSandbox(sourceId, "capture");
  const { snapshot: base, image, ram } = opts.source ?? (await mappedImage(sourceId));
  // Two stacks: what the capture holds goes whatever happens; the work dirs go only
  // if it is never registered (registration moves them into place). Each unwinds
  // every step, newest first, even when one throws.
  const held = new UndoStack();
  const workDirs = new UndoStack();
  held.push("let the staged image be evicted again", holdStaged(stageKey(base)));
  const { work, stageWork } = await snapshotWorkDirs();
  workDirs.push("remove the snapshot work dir", () => fsp.rm(work, { recursive: true, force: true }));
  workDirs.push("remove the staging work dir", () => fsp.rm(stageWork, { recursive: true, force: true }));
  const captureDir = await shmWorkDir().catch(async (err: unknown) => {
    throw withTeardownFailures(err, [...(await held.unwind()), ...(await workDirs.unwind())]);
  });
  held.push("remove the capture dir", () => fsp.rm(captureDir, { recursive: true, force: true }));
  const out = {
    vmstate: path.join(captureDir, "capture.vmstate"),
    layer: path.join(captureDir, "capture.layer"),
    pagemap: path.join(captureDir, "capture.pagemap"),
  };
  const devicesPath = path.join(row.run_dir, `capture-${path.basename(captureDir).slice(-8)}.devices`);
  held.push("remove the saved device state", () => fsp.rm(devicesPath, { force: true }));
  let released = false;
  /** Give back what the capture holds (and the work dirs unless registered); what could not be undone comes back. */
  const release = async (keep: "registered" | "nothing") => {
    if (released) return [];
    released = true;
    const failures = await held.unwind();
    if (keep === "registered") workDirs.commit();
    return [...failures, ...(await workDirs.unwind())];
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
      faultPoint("branch.live-captured");
      // QEMU wrote it in its own runtime dir: read once, without following a link
      // there, and handed on from a copy of root's, never from that path again.
      const devices = await readVmmFile(devicesPath, MAX_DEVICE_STATE_BYTES);
      if (!devices) {
        throw new ForkdError(
          "invalid_state",
          `the device state ${sourceId}'s VMM saved is not a plain file of at most ${MAX_DEVICE_STATE_BYTES} bytes`,
          {
            id: sourceId,
          },
        );
      }
      const devicesCopy = path.join(captureDir, "capture.devices");
      await fsp.writeFile(devicesCopy, devices, { mode: 0o600 });
      // The children's stream: the snapshot's start, the written pages, the source's devices.
      await capture.finish(devicesCopy, deviceSplice(prefix, devices));
      // The durable snapshot's stream has no pages (its memory image holds them).
      await fsp.writeFile(path.join(work, "vmstate.bin"), spliceDevices(prefix, devices), { mode: 0o600 });
    } finally {
      capture.kill();
    }
  } catch (err) {
    throw withTeardownFailures(err, await release("nothing"));
  }
  const from: CaptureSource = {
    snapshot: { ...base, tag, vmstatePath: out.vmstate, parent: base.tag, branchedFrom: sourceId },
    memoryPath: image,
  };
  // Unwound first: forks restoring from the capture finish loading it before its files go.
  held.push("withdraw the offered capture", offerCapture(tag, from));
  const readyAt = performance.now();
  let registering: Promise<SnapshotInfo> | undefined;
  const register = async (): Promise<SnapshotInfo> => {
    try {
      const memory = path.join(stageWork, "memory.bin");
      await fsp.copyFile(image, memory, fs.constants.COPYFILE_FICLONE);
      await fsp.chmod(memory, 0o600);
      await applyDiffLayer(memory, out.layer, out.pagemap);
      // Stored as the pages that differ from the image the source maps, unless that chain is at its limit.
      const depth = (await ancestorsOf(base)).length + 1;
      const captureMs = readyAt - opts.startedAt;
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
          branch: { mode: "live", pauseMs, captureMs },
          timings: { bootMs: 0, warmMs: 0, saveMs: captureMs, totalMs: performance.now() - opts.startedAt },
        },
      });
      const failures = await release("registered");
      if (failures.length > 0) throw withTeardownFailures(new ForkdError("io_error", `snapshot ${tag} was registered`), failures);
      return info;
    } catch (err) {
      throw withTeardownFailures(err, await release("nothing"));
    }
  };
  return {
    tag,
    sourceId,
    base,
    from,
    pauseMs,
    readyAt,
    capturedPages,
    register: () => {
      registering ??= register();
      return registering;
    },
    discard: async () => {
      const failures = await release("nothing");
      if (failures.length > 0) throw withTeardownFailures(new ForkdError("io_error", `discarding the capture ${tag}`), failures);
    },
  };
}

/**
 * Stop the source, copy its written pages, save its devices, resume it. The pause
 * is QEMU's own STOP→RESUME; whatever fails, the source runs again. The branch row
 * says the source may be paused for exactly that window, so recovery resumes a
 * source whose capturer died inside it.
 */
async function pauseAndCopy(
  runDir: string,
  tag: string,
  devicesPath: string,
  capture: PageCapture,
): Promise<{ pauseMs: number; capturedPages: number }> {
  const qmp = await QmpClient.connect(runtimePaths(runDir).qmp, { timeoutMs: 10_000 });
  const events: QmpEvent[] = [];
  qmp.on("event", (e) => events.push(e));
  let stopped = false;
  try {
    branches.setSourcePaused(tag, true);
    stopped = true;
    await qmp.execute("stop", {});
    faultPoint("branch.live-stopped");
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
