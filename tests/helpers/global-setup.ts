// One temp root for the whole test run; removed (with any VMM still under it)
// when the run ends, so repeated runs do not fill the disk with snapshots.
import { spawnSync } from "node:child_process";
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
    removeEgressNamespaces(root);
    fs.rmSync(root, { recursive: true, force: true });
  };
}

/** Each test file's runtime dir may have left an egress namespace (veth, host nft table) behind: remove them. */
function removeEgressNamespaces(root: string): void {
  for (const test of fs.readdirSync(root)) {
    const state = path.join(root, test, "run", "netns.json");
    if (!fs.existsSync(state)) continue;
    const ns = JSON.parse(fs.readFileSync(state, "utf8")) as { netns: string; hostVeth: string; hostTable: string };
    spawnSync("ip", ["netns", "delete", ns.netns], { stdio: "ignore" });
    spawnSync("ip", ["link", "delete", ns.hostVeth], { stdio: "ignore" });
    spawnSync("nft", ["delete", "table", "inet", ns.hostTable], { stdio: "ignore" });
  }
}
