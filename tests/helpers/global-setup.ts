// One temp root for the whole test run; removed (with any VMM still under it)
// when the run ends, so repeated runs do not fill the disk with snapshots.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { qemuPidsUnder } from "./env.js";

export default function setup(): () => void {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-tests-"));
  process.env.FORKD_TEST_ROOT = root;
  return () => {
    for (const pid of qemuPidsUnder(root)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    fs.rmSync(root, { recursive: true, force: true });
  };
}
