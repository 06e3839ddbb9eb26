// Every test file gets its own FORKD_HOME and FORKD_RUN_DIR so state never leaks
// between files or into the machine's real store; the (slow to build, immutable)
// guest images are shared by linking the real images dir in.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const CLI = path.join(REPO_ROOT, "packages/cli/dist/main.js");

export function isolateForkd(): { home: string; runDir: string } {
  const realHome = process.env.FORKD_HOME ?? "/var/lib/forkd";
  const root = fs.mkdtempSync(path.join(process.env.FORKD_TEST_ROOT ?? os.tmpdir(), "forkd-test-"));
  const home = path.join(root, "home");
  const runDir = path.join(root, "run");
  fs.mkdirSync(home, { recursive: true });
  fs.mkdirSync(runDir, { recursive: true });
  if (fs.existsSync(path.join(realHome, "images"))) fs.symlinkSync(path.join(realHome, "images"), path.join(home, "images"));
  process.env.FORKD_HOME = home;
  process.env.FORKD_RUN_DIR = runDir;
  return { home, runDir };
}

export function qemuPidsUnder(dir: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8");
      if (cmdline.includes("qemu-system") && cmdline.includes(dir)) pids.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}
