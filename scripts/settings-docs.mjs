// Writes README.md's configuration tables from forkd's settings table
// (packages/core/src/common/settings.ts) between its settings markers:
// `npm run docs:settings` after `npm run build`. tests/unit/settings.test.ts fails
// while the README and the table differ.
import fs from "node:fs";
import { settingsMarkdown } from "../packages/core/dist/common/settings.js";

const README = new URL("../README.md", import.meta.url);
const BLOCK_RE = /(<!-- settings:begin -->\n)[\s\S]*?(<!-- settings:end -->)/;

const readme = fs.readFileSync(README, "utf8");
if (!BLOCK_RE.test(readme)) {
  process.stderr.write("README.md has no <!-- settings:begin --> … <!-- settings:end --> block\n");
  process.exit(1);
}
const updated = readme.replace(BLOCK_RE, (_, begin, end) => `${begin}${settingsMarkdown()}\n${end}`);
if (updated !== readme) fs.writeFileSync(README, updated);
process.stdout.write(updated === readme ? "README.md: settings already up to date\n" : "README.md: settings rewritten\n");
