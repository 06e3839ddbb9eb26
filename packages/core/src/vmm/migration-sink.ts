// Where outgoing migrations go. QEMU runs confined with spawn=deny, so it cannot
// run `exec:cat > FILE`; instead it connects to a unix socket in its own runtime
// dir, and an unprivileged `cat` copies the stream into the file: the bytes never
// pass through the daemon's heap or event loop. The copier owns the listening
// socket from before QEMU is pointed at it (forkd-vmm-launch --listen-unix), so
// the daemon dying at any moment never leaves QEMU a dead listener. It also dies
// with the daemon (--die-with-parent): a daemon killed mid-capture must not leave
// a copy writing to /dev/shm; its migration then fails and start-up recovery
// resumes the source.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { ForkdError } from "../common/errors.js";
import { launcherPath, VMM_GID } from "./confine.js";
import { claimUid, releaseUid, runDirUid } from "./process.js";
import { type QmpClient, waitForMigration } from "./qmp.js";

export type MigrationSink = {
  /** The URI to hand to QMP `migrate`. */
  uri: string;
  /** Settles with the bytes written once QEMU closed the stream and the file is synced. */
  written: Promise<number>;
  /** Stop listening (and kill the copier if the migration was abandoned). */
  close: () => void;
};

export async function openMigrationSink(runDir: string, target: string): Promise<MigrationSink> {
  const socketPath = path.join(runDir, `migrate-${randomBytes(4).toString("hex")}.sock`);
  const launcher = launcherPath();
  if (!fs.existsSync(launcher)) throw new ForkdError("missing_dependency", `${launcher} is not built; run \`npm run build\``);
  const uid = runDirUid(runDir);
  // As root the launcher drops, once it has accepted, to a uid of the copier's own
  // (claimed like a VMM's, freed when it exits; no groups, no capabilities,
  // no_new_privs): it owns nothing of forkd's and holds only the two fds it is given,
  // and no VMM or other copier shares its uid to signal or trace it.
  const copierUid = process.geteuid?.() === 0 ? claimUid(runDir) : undefined;
  const args = [
    ...(copierUid !== undefined ? ["--uid", String(copierUid), "--gid", String(copierUid)] : []),
    "--parent-pid",
    String(process.pid),
    "--die-with-parent",
    "--listen-unix",
    socketPath,
    // The VMM connects as its own uid.
    ...(uid !== undefined ? ["--socket-owner", `${uid}:${VMM_GID}`] : []),
    "--",
    "/bin/cat",
  ];
  const out = fs.openSync(target, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_NOFOLLOW, 0o600);
  let copier: ReturnType<typeof spawn>;
  try {
    // No environment: the daemon's (FORKD_TOKEN, registry and cloud credentials) is not the copier's business.
    copier = spawn(launcher, args, { stdio: ["ignore", out, "pipe"], env: {} });
  } catch (err) {
    if (copierUid !== undefined) releaseUid(copierUid, runDir);
    throw err;
  } finally {
    fs.closeSync(out);
  }
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>((resolve) => {
    copier.once("exit", (code, signal) => resolve({ code, signal }));
    copier.once("error", (error) => resolve({ code: null, signal: null, error }));
  });
  // The uid is free again once no process runs as it (a copier that never started emits only "error").
  if (copierUid !== undefined) {
    const release = () => releaseUid(copierUid, runDir);
    copier.once("exit", release).once("error", release);
  }
  let stderr = "";
  await new Promise<void>((resolve, reject) => {
    copier.stderr!.setEncoding("utf8").on("data", (d: string) => {
      stderr = (stderr + d).slice(-2000);
      if (stderr.includes("ready\n")) resolve();
    });
    exited.then(
      ({ code, signal, error }) =>
        reject(
          new ForkdError(
            "io_error",
            `could not start the migration copier: ${error?.message ?? (stderr.trim() || "no output")} (${signal ?? `code ${code}`})`,
          ),
        ),
      reject,
    );
  });
  const written = exited.then(({ code, signal }) => {
    if (code !== 0) throw new ForkdError("io_error", `the migration copier into ${target} ended with ${signal ?? `code ${code}`}`);
    const fd = fs.openSync(target, "r");
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    return fs.statSync(target).size;
  });
  written.catch(() => {});
  return {
    uri: `unix:${socketPath}`,
    written,
    close: () => {
      if (copier.exitCode === null && copier.signalCode === null) copier.kill("SIGKILL");
      fs.rmSync(socketPath, { force: true });
    },
  };
}

/** Migrate the VM behind `qmp` into `target` and wait until the file is whole. */
export async function migrateToFile(qmp: QmpClient, runDir: string, target: string, timeoutMs: number, what: string): Promise<number> {
  const sink = await openMigrationSink(runDir, target);
  try {
    await qmp.execute("migrate", { uri: sink.uri });
    await waitForMigration(qmp, timeoutMs, what);
    return await sink.written;
  } finally {
    sink.close();
  }
}
