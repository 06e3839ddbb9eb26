// What benchmarks start and measure against: cold boots, a bare VMM, a real daemon.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import {
  ForkdError,
  getSnapshot,
  killAndWait,
  launchQemu,
  makeRunDir,
  newSandboxId,
  planRestore,
  pssBytes,
  QmpClient,
  removeRunDir,
  runtimePaths,
  sealedSource,
  stageSnapshot,
  Vm,
} from "@forkd/core";
import { Controller } from "@forkd/sdk";

export async function coldBootsMs(runs: number, image: string, accel: "kvm" | "tcg", onStep: (i: number) => void): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    onStep(i);
    const { vm, timings } = await Vm.boot({ image, accel, ephemeral: true });
    samples.push(timings.totalMs);
    await vm.destroy();
  }
  return samples;
}

/** PSS of a QEMU started exactly like a child (same flags, same memory file) but with no guest running. */
export async function vmmFloorBytes(tag: string): Promise<number> {
  const snapshot = await getSnapshot(tag);
  const source = await sealedSource(await stageSnapshot(snapshot));
  const id = newSandboxId();
  const runDir = await makeRunDir(id);
  const launched = launchQemu({
    plan: planRestore(snapshot, { runDir, memory: { kind: "sealed", source }, network: true }),
    dieWithParent: true,
  });
  try {
    const qmp = await QmpClient.connect(runtimePaths(runDir).qmp);
    await new Promise((r) => setTimeout(r, 500));
    const pss = pssBytes(launched.pid) ?? Number.NaN;
    qmp.close();
    return pss;
  } finally {
    await killAndWait(launched.pid, runDir, launched);
    await removeRunDir(runDir);
  }
}

/** A real daemon process on a private socket, for benchmarks that measure through the API. */
export async function startBenchDaemon(): Promise<{ controller: Controller; stop: () => Promise<void> }> {
  const dir = fs.mkdtempSync(`${os.tmpdir()}/forkd-bench-`);
  const tokenFile = `${dir}/token`;
  fs.writeFileSync(tokenFile, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
  const token = fs.readFileSync(tokenFile, "utf8").trim();
  const socket = `${dir}/forkd.sock`;
  const daemon = spawn(
    process.execPath,
    [process.argv[1]!, "daemon", "--socket", socket, "--listen", "none", "--token-file", tokenFile, "--audit-log", `${dir}/audit.log`],
    {
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let log = "";
  daemon.stderr!.setEncoding("utf8").on("data", (d: string) => (log += d));
  const stop = async () => {
    await controller.close();
    if (daemon.exitCode === null) {
      daemon.kill("SIGTERM");
      await new Promise((r) => daemon.once("exit", r));
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const controller = new Controller({ socketPath: socket, token });
  const deadline = Date.now() + 60_000;
  while (!/unix /.test(log)) {
    if (daemon.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new ForkdError("internal", `the daemon did not start: ${log}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { controller, stop };
}
