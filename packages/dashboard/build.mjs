// Bundles the dashboard into dist/ui: one script, one stylesheet (the page's and
// the widgets'), index.html. Everything the page needs is in these files; the
// daemon serves them at /ui and nothing is fetched from elsewhere at run time.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.join(here, "dist/ui");
fs.rmSync(out, { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });
await build({
  entryPoints: { app: path.join(here, "src/main.ts") },
  bundle: true,
  format: "esm",
  target: "es2022",
  platform: "browser",
  minify: true,
  sourcemap: false,
  outdir: out,
  logLevel: "warning",
  legalComments: "linked",
});
fs.copyFileSync(path.join(here, "static/index.html"), path.join(out, "index.html"));
