// First paint of the dashboard with 100 sandboxes and 50 snapshots, in headless
// Debian chromium (playwright-core). The page's built files are served as the
// daemon serves them, with the API answered from made-up lists of that size (no
// VMs: what is measured is the page, from navigation to its first paint and to
// the tree and table drawn). Not a timed test: run `node bench/dashboard-paint.mjs`.
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const UI = path.join(path.dirname(fileURLToPath(import.meta.url)), "../packages/dashboard/dist/ui");
const TOKEN = "bench-token-0123456789abcdef";
const now = Math.floor(Date.now() / 1000);
const snapshots = Array.from({ length: 50 }, (_, i) => ({
  tag: `snap-${i}`,
  status: "ready",
  created_at_unix: now - 3600 + i,
  created_at: new Date((now - 3600 + i) * 1000).toISOString(),
  parent: i === 0 ? null : `snap-${Math.floor((i - 1) / 3)}`,
  storage: i === 0 ? "full" : "diff",
  ...(i % 5 === 4 ? { mode: "live", branched_from: `sb-${String(i).padStart(12, "0")}`, pause_ms: 40 } : {}),
  memory_bytes: 128 * 2 ** 20,
  physical_bytes: 2 ** 20 * (i + 1),
  memory_mib: 128,
  image: "base",
}));
const CLUSTER = process.argv.includes("--cluster");
const sandboxes = Array.from({ length: 100 }, (_, i) => ({
  id: `sb-${String(i).padStart(12, "0")}`,
  snapshot_tag: `snap-${i % 50}`,
  guest_addr: "virtio-serial:forkd.agent",
  created_at: new Date((now - i * 7) * 1000).toISOString(),
  created_at_unix: now - i * 7,
  memory_mib: 128,
  vcpus: 1,
  memory_limit_mib: null,
  state: "running",
  network: "public",
  network_policy: { mode: "public", allow_out: [], deny_out: [] },
  expires_at: null,
  health: i % 17 === 0 ? "unhealthy" : "healthy",
  health_reason: i % 17 === 0 ? "malformed frame" : null,
  branch_count: 0,
  metadata: {},
  // --cluster: a merged list from three nodes (the table gains its node column and filter).
  ...(CLUSTER ? { node: `node-${i % 3}` } : {}),
}));
const metrics = {
  ts: new Date().toISOString(),
  sandboxes_active: 100,
  forks_per_min: 12,
  spawn_p50_ms: 180,
  spawn_p99_ms: 900,
  pool_claim_p50_ms: 3,
  pool_claim_p99_ms: 14,
  pool_claims_seen: 40,
  spawns_seen: 100,
  host: { mem_total_bytes: 25e9, mem_available_bytes: 12e9, shm_total_bytes: 12e9, shm_free_bytes: 8e9, shm_reserved_bytes: 1e8 },
  sandboxes: Object.fromEntries(sandboxes.map((s) => [s.id, { memory_bytes: 40 * 2 ** 20, cpu_usec: 1000 }])),
};
const API = { "/v1/sandboxes": sandboxes, "/v1/snapshots": snapshots, "/v1/pools": [], "/v1/jobs": [], "/v1/metrics/summary": metrics };
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

const server = http.createServer((req, res) => {
  const url = req.url.split("?")[0];
  if (url === "/ui" || url.startsWith("/ui/")) {
    const name = url === "/ui" ? "index.html" : url.slice(4);
    const file = path.join(UI, path.basename(name));
    if (!fs.existsSync(file)) return res.writeHead(404).end();
    return res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream" }).end(fs.readFileSync(file));
  }
  if (req.headers.authorization !== `Bearer ${TOKEN}`) return res.writeHead(401).end();
  if (url === "/v1/events") return res.writeHead(200, { "content-type": "text/event-stream" }).write("event: hello\ndata: {}\n\n");
  if (url in API) return res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(API[url]));
  res.writeHead(404).end();
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}`;
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
const runs = [];
for (let i = 0; i < 5; i++) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(`${base}/ui#token=${TOKEN}`);
  await page.locator("body[data-ready=true]").waitFor();
  await page.locator("tr[data-sandbox]").nth(99).waitFor({ state: "attached" });
  const t = await page.evaluate(() => ({
    fcp: performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? null,
    ready: performance.now(),
  }));
  t.nodeColumn = await page.locator('th[data-sort="node"]').isVisible();
  t.nodeRows = await page.locator("tr[data-sandbox] td.mono", { hasText: /^node-[0-2]$/ }).count();
  runs.push(t);
  await page.close();
}
await browser.close();
server.close();
const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const result = {
  cpu_model: os.cpus()[0]?.model ?? "unknown",
  load_1m: os.loadavg()[0],
  cluster: CLUSTER,
  node_column_shown: runs.every((r) => r.nodeColumn),
  node_cells: runs[0]?.nodeRows ?? 0,
  sandboxes: 100,
  snapshots: 50,
  first_contentful_paint_ms_p50: Math.round(med(runs.map((r) => r.fcp))),
  tree_and_table_drawn_ms_p50: Math.round(med(runs.map((r) => r.ready))),
  runs: runs.map((r) => ({ fcp: Math.round(r.fcp), drawn: Math.round(r.ready) })),
};
console.table([
  {
    cpu: result.cpu_model,
    load: result.load_1m.toFixed(1),
    fcp_p50_ms: result.first_contentful_paint_ms_p50,
    drawn_p50_ms: result.tree_and_table_drawn_ms_p50,
    node_column: result.node_column_shown,
  },
]);
const out = path.join(path.dirname(fileURLToPath(import.meta.url)), "results", "dashboard-paint.json");
fs.mkdirSync(path.dirname(out), { recursive: true });
fs.writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
console.log(`wrote ${out}`);
