// Where outgoing migrations go. QEMU runs confined with spawn=deny, so it cannot
// run `exec:cat > FILE`; instead it connects to a unix socket in its own runtime
// dir, and an unprivileged `cat` that forkd starts copies the stream into the
// file: the bytes never pass through the daemon's heap or event loop. The copier
// dies with the process that started it (forkd-vmm-launch --die-with-parent): a
// daemon killed mid-capture must not leave a copy writing to /dev/shm; its
// migration then fails and start-up recovery resumes the source. Except for a
// background snapshot (live BRANCH), where a failing stream deadlocks QEMU 7.2 (a
// vCPU waiting on a write-protected page holds the lock the failed migration needs
// to lift the protection): that copy is one bounded pass over RAM, left to finish.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { ForkdError } from "../common/errors.js";
import { launcherPath, VMM_GID } from "./confine.js";
import { runDirUid } from "./process.js";
import { type QmpClient, waitForMigration } from "./qmp.js";

/** The copier owns nothing of forkd's: it only holds the two fds it is given. */
const NOBODY = 65_534;

export type MigrationSink = {
  /** The URI to hand to QMP `migrate`. */
  uri: string;
  /** Settles with the bytes written once QEMU closed the stream and the file is synced. */
  written: Promise<number>;
  /** Stop listening (and kill the copier if the migration was abandoned). */
  close: () => void;
};

export async function openMigrationSink(runDir: string, target: string, opts: { dieWithParent?: boolean } = {}): Promise<MigrationSink> {
  const socketPath = path.join(runDir, `migrate-${randomBytes(4).toString("hex")}.sock`);
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const uid = runDirUid(runDir);
  if (uid !== undefined) fs.chownSync(socketPath, uid, VMM_GID);
  let copier: ReturnType<typeof spawn> | undefined;
  const written = new Promise<number>((resolve, reject) => {
    server.once("connection", (socket) => {
      server.close();
      const out = fs.openSync(target, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_NOFOLLOW, 0o600);
      try {
        const launcher = launcherPath();
        if (!fs.existsSync(launcher)) {
          throw new ForkdError("missing_dependency", `${launcher} is not built; run \`npm run build\``);
        }
        // As root the launcher drops to nobody (no capabilities, no_new_privs) before the exec.
        const drop = process.geteuid?.() === 0 ? ["--uid", String(NOBODY), "--gid", String(NOBODY), "--groups", String(NOBODY)] : [];
        const die = opts.dieWithParent === false ? [] : ["--die-with-parent"];
        copier = spawn(launcher, [...drop, ...die, "--", "/bin/cat"], { stdio: [socket, out, "ignore"] });
      } catch (err) {
        reject(err);
        return;
      } finally {
        fs.closeSync(out);
        socket.destroy();
      }
      copier.once("error", (err) => reject(new ForkdError("io_error", `could not start the migration copier: ${err.message}`)));
      copier.once("exit", (code, signal) => {
        if (code !== 0) {
          reject(new ForkdError("io_error", `the migration copier into ${target} ended with ${signal ?? `code ${code}`}`));
          return;
        }
        try {
          const fd = fs.openSync(target, "r");
          fs.fsyncSync(fd);
          fs.closeSync(fd);
          resolve(fs.statSync(target).size);
        } catch (err) {
          reject(err);
        }
      });
    });
  });
  written.catch(() => {});
  return {
    uri: `unix:${socketPath}`,
    written,
    close: () => {
      server.close();
      if (copier && copier.exitCode === null) copier.kill("SIGKILL");
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
