// Writes the shell scripts forkd generates for its guests (the two init stages,
// the node wrapper, the busybox shims) into a directory, exactly as the image
// builder writes them, so scripts/lint-sh.sh can shellcheck them. Reads the
// built packages/core (npm run build first).
import fs from "node:fs";
import path from "node:path";
import { busyboxShims } from "../packages/core/dist/guest/busybox.js";
import { GUEST_MODULES, initramfsInit, nodeWrapper, stage2Init } from "../packages/core/dist/guest/guest-init.js";

const outDir = process.argv[2];
if (!outDir) throw new Error("usage: node scripts/write-guest-scripts.mjs OUT_DIR");

// Named after where each comes from, which is what shellcheck's report shows.
const scripts = [
  { name: "guest-init.ts/initramfsInit", text: initramfsInit(GUEST_MODULES) },
  { name: "guest-init.ts/stage2Init", text: stage2Init() },
  { name: "guest-init.ts/nodeWrapper", text: nodeWrapper() },
  ...busyboxShims(true).map((shim) => ({ name: `busybox.ts/busyboxShims/${path.basename(shim.path)}`, text: shim.text })),
];
for (const script of scripts) {
  const file = path.join(outDir, script.name);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, script.text);
}
