// forkd's dashboard. Everything shown comes from the public REST v1 API and the
// event stream (GET /v1/events); every action is an ordinary API call with the
// bearer token, validated and audited by the daemon like any other client's.
import "@xterm/xterm/css/xterm.css";
import "./style.css";
import {
  ApiError,
  call,
  enc,
  eventStream,
  type Job,
  type MetricsSummary,
  type Pool,
  type Sandbox,
  type Snapshot,
  type SnapshotInfo,
  storedToken,
  storeToken,
  takeTokenFromFragment,
} from "./api.js";
import { Charts } from "./charts.js";
import { button, bytes, clear, duration, errorText, h, notify } from "./dom.js";
import { FilesPanel, TerminalPanel } from "./terminal.js";
import { chainDepth, layerKind, type Selection, TreeView } from "./tree.js";

type State = {
  sandboxes: Sandbox[];
  snapshots: Snapshot[];
  pools: Pool[];
  jobs: Job[];
  metrics: MetricsSummary | undefined;
  previousMetrics: MetricsSummary | undefined;
  selected: Selection | undefined;
  sort: { key: SortKey; dir: 1 | -1 };
  filter: string;
  /** The node filter's choice ("" = every node). */
  node: string;
};
type SortKey = "id" | "node" | "snapshot" | "state" | "health" | "age" | "memory" | "cpu";

const state: State = {
  sandboxes: [],
  snapshots: [],
  pools: [],
  jobs: [],
  metrics: undefined,
  previousMetrics: undefined,
  selected: undefined,
  sort: { key: "age", dir: 1 },
  filter: "",
  node: "",
};

const app = document.getElementById("app")!;

function loginView(message?: string): void {
  const input = h("input", { id: "token", type: "password", autocomplete: "current-password", required: true, spellcheck: "false" });
  const form = h(
    "form",
    { class: "login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "forkd dashboard"),
    h("p", {}, "Log in with the daemon's bearer token (", h("code", {}, "forkd ui"), " prints a link that logs in)."),
    message ? h("p", { class: "notice error", role: "alert" }, message) : null,
    h("label", { for: "token" }, "Token"),
    input,
    h("button", { type: "submit" }, "Log in"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    storeToken(input.value.trim());
    start().catch((err: unknown) => loginView(errorText(err)));
  });
  app.replaceChildren(form);
  input.focus();
}

let tree: TreeView;
let charts: Charts;
let terminal: TerminalPanel;
let files: FilesPanel;
let infoEl: HTMLElement;
let tableBody: HTMLElement;
let tableCaption: HTMLElement;
/** The node column and the node filter exist only in a cluster (sandboxes then carry `node`). */
let nodeHeader: HTMLElement;
let nodeFilter: HTMLSelectElement;
let poolsEl: HTMLElement;
/** Hand-out latency of pooled children, from the metrics summary. */
let poolLatencyEl: HTMLElement;
let jobsEl: HTMLElement;
let connEl: HTMLElement;
let stopEvents: (() => void) | undefined;

/** Pull a snapshot (OCI reference, hub name or pack URL) into this host, as a job. */
function pullForm(): HTMLElement {
  const ref = h("input", { id: "pull-ref", type: "text", placeholder: "oci://registry/repo:tag", spellcheck: "false" });
  const tag = h("input", { id: "pull-tag", type: "text", placeholder: "(its own)", spellcheck: "false", class: "narrow" });
  return h(
    "div",
    { class: "row" },
    h("label", { for: "pull-ref" }, "Pull"),
    ref,
    h("label", { for: "pull-tag" }, "as tag"),
    tag,
    button("Pull", () => pull(ref.value.trim(), tag.value.trim())),
  );
}

function section(id: string, title: string, ...body: (Node | null)[]): HTMLElement {
  return h("section", { id, "aria-labelledby": `${id}-h` }, h("h2", { id: `${id}-h` }, title), ...body);
}

function layout(): void {
  connEl = h("span", { class: "conn", role: "status" }, "connecting…");
  const listHolder = h("div", {});
  const graph = h("div", {
    id: "graph",
    class: "graph",
    role: "img",
    "aria-label": "Snapshot tree (the list beside it has the same nodes)",
  });
  charts = new Charts();
  terminal = new TerminalPanel();
  files = new FilesPanel();
  infoEl = h("div", { id: "node-info", class: "info", "aria-live": "polite" }, h("p", { class: "muted" }, "Select a snapshot or sandbox."));
  tableBody = h("tbody", {});
  tableCaption = h("caption", {}, "Sandboxes");
  poolsEl = h("div", {});
  poolLatencyEl = h("p", { id: "pool-latency", "aria-live": "polite" });
  jobsEl = h("div", {});
  const filter = h("input", { id: "sb-filter", type: "search", placeholder: "id, snapshot, state…", autocomplete: "off" });
  filter.addEventListener("input", () => {
    state.filter = filter.value.trim().toLowerCase();
    renderTable();
  });
  nodeFilter = h("select", { id: "sb-node", "aria-label": "Show the sandboxes of one node", hidden: true });
  nodeFilter.addEventListener("change", () => {
    state.node = nodeFilter.value;
    renderTable();
  });
  const sortHeader = (key: SortKey, label: string) => {
    const b = button(label, () => {
      state.sort = state.sort.key === key ? { key, dir: state.sort.dir === 1 ? -1 : 1 } : { key, dir: 1 };
      renderTable();
    });
    b.className = "linklike";
    return h("th", { scope: "col", "data-sort": key }, b);
  };
  nodeHeader = sortHeader("node", "Node");
  nodeHeader.hidden = true;
  app.replaceChildren(
    h(
      "header",
      { class: "top" },
      h("h1", {}, "forkd"),
      h(
        "nav",
        { "aria-label": "Sections" },
        h("a", { href: "#tree" }, "Tree"),
        h("a", { href: "#sandboxes" }, "Sandboxes"),
        h("a", { href: "#terminal" }, "Terminal"),
        h("a", { href: "#pools" }, "Pools & jobs"),
        h("a", { href: "#metrics" }, "Metrics"),
      ),
      connEl,
      button("Log out", () => {
        stopEvents?.();
        storeToken(null);
        loginView();
      }),
    ),
    h("div", { id: "notices", class: "notices" }),
    h(
      "main",
      {},
      section(
        "tree",
        "Snapshot tree",
        pullForm(),
        h(
          "div",
          { class: "tree-wrap" },
          graph,
          h("div", { class: "side" }, infoEl, h("details", { open: true }, h("summary", {}, "Tree as a list"), listHolder)),
        ),
      ),
      section(
        "sandboxes",
        "Sandboxes",
        h("div", { class: "row" }, h("label", { for: "sb-filter" }, "Filter"), filter, nodeFilter),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "sandboxes" },
            tableCaption,
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                sortHeader("id", "Sandbox"),
                nodeHeader,
                sortHeader("snapshot", "Snapshot"),
                sortHeader("state", "State"),
                sortHeader("health", "Health"),
                sortHeader("age", "Age"),
                h("th", { scope: "col" }, "Time left"),
                sortHeader("cpu", "CPU"),
                sortHeader("memory", "Memory"),
                h("th", { scope: "col" }, "Egress"),
                h("th", { scope: "col" }, "Actions"),
              ),
            ),
            tableBody,
          ),
        ),
      ),
      section("terminal", "Terminal and files", terminal.el, h("h3", {}, "Files"), files.el),
      section("pools", "Pools and jobs", h("h3", {}, "Hot pools"), poolsEl, poolLatencyEl, h("h3", {}, "Jobs"), jobsEl),
      section("metrics", "Metrics", charts.el),
    ),
  );
  // cytoscape measures its container: made once the container is in the page.
  tree = new TreeView(graph, (sel) => select(sel));
  listHolder.replaceWith(tree.list);
  new ResizeObserver(() => tree.resize()).observe(graph);
}

async function refresh(): Promise<void> {
  const [sandboxes, snapshots, pools, jobs] = await Promise.all([
    call<Sandbox[]>("GET", "/v1/sandboxes"),
    call<Snapshot[]>("GET", "/v1/snapshots"),
    call<Pool[]>("GET", "/v1/pools"),
    call<Job[]>("GET", "/v1/jobs"),
  ]);
  Object.assign(state, { sandboxes, snapshots, pools, jobs });
  render();
}

async function refreshMetrics(): Promise<void> {
  takeMetrics(await call<MetricsSummary>("GET", "/v1/metrics/summary"));
}

function takeMetrics(m: MetricsSummary): void {
  state.previousMetrics = state.metrics;
  state.metrics = m;
  charts.push(m);
  poolLatencyEl.replaceChildren(
    m.pool_claims_seen > 0
      ? `Hand-out (taken from a pool, fresh identity answered), last ${m.pool_claims_seen}: p50 ${m.pool_claim_p50_ms} ms, p99 ${m.pool_claim_p99_ms} ms`
      : "No pooled child handed out yet.",
  );
  renderTable();
}

/** Events come in bursts (a fork of 10 is 10 events): one refresh for each burst. */
let refreshPending = false;
function refreshSoon(): void {
  if (refreshPending) return;
  refreshPending = true;
  setTimeout(() => {
    refreshPending = false;
    refresh().catch((e: unknown) => notify(errorText(e), "error"));
  }, 150);
}

function render(): void {
  tree.update(state.snapshots, state.sandboxes);
  renderTable();
  renderPoolsAndJobs();
  renderInfo().catch((e: unknown) => notify(errorText(e), "error"));
}

function cpuPercent(id: string): number | null {
  const now = state.metrics;
  const before = state.previousMetrics;
  const a = before?.sandboxes[id]?.cpu_usec;
  const b = now?.sandboxes[id]?.cpu_usec;
  if (!now || !before || a === null || a === undefined || b === null || b === undefined) return null;
  const wallUs = (Date.parse(now.ts) - Date.parse(before.ts)) * 1000;
  return wallUs > 0 ? Math.max(0, ((b - a) / wallUs) * 100) : null;
}

function sortValue(s: Sandbox, key: SortKey): string | number {
  switch (key) {
    case "id":
      return s.id;
    case "node":
      return s.node ?? "";
    case "snapshot":
      return s.snapshot_tag ?? "";
    case "state":
      return s.state;
    case "health":
      return s.health;
    case "age":
      return -s.created_at_unix;
    case "memory":
      return state.metrics?.sandboxes[s.id]?.memory_bytes ?? -1;
    case "cpu":
      return cpuPercent(s.id) ?? -1;
  }
}

function renderTable(): void {
  const now = Date.now();
  const { key, dir } = state.sort;
  const nodes = [...new Set(state.sandboxes.flatMap((s) => (s.node ? [s.node] : [])))].sort();
  const clustered = nodes.length > 0;
  nodeHeader.hidden = !clustered;
  nodeFilter.hidden = !clustered;
  if (clustered && nodeFilter.options.length !== nodes.length + 1) {
    nodeFilter.replaceChildren(h("option", { value: "" }, "all nodes"), ...nodes.map((n) => h("option", { value: n }, n)));
    nodeFilter.value = nodes.includes(state.node) ? state.node : "";
  }
  const rows = state.sandboxes
    .filter(
      (s) =>
        (!state.node || s.node === state.node) &&
        (!state.filter ||
          [s.id, s.node ?? "", s.snapshot_tag ?? "", s.state, s.health, s.network].some((v) => v.toLowerCase().includes(state.filter))),
    )
    .sort((a, b) => {
      const x = sortValue(a, key);
      const y = sortValue(b, key);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
  tableCaption.replaceChildren(
    `${rows.length} of ${state.sandboxes.length} sandboxes, sorted by ${key} ${dir === 1 ? "ascending" : "descending"}`,
  );
  tableBody.replaceChildren(
    ...rows.map((s) => {
      const usage = state.metrics?.sandboxes[s.id];
      const cpu = cpuPercent(s.id);
      const left = s.expires_at ? Date.parse(s.expires_at) - now : null;
      const egress = s.network_policy
        ? `${s.network_policy.mode}${s.network_policy.allow_out.length ? ` +${s.network_policy.allow_out.join(",")}` : ""}${s.network_policy.deny_out.length ? ` −${s.network_policy.deny_out.join(",")}` : ""}`
        : s.network;
      return h(
        "tr",
        { "data-sandbox": s.id, class: s.health === "unhealthy" ? "unhealthy" : undefined },
        h("th", { scope: "row", class: "mono" }, s.id),
        clustered ? h("td", { class: "mono" }, s.node ?? "–") : null,
        h("td", {}, s.snapshot_tag ?? "–"),
        h("td", {}, s.state),
        h(
          "td",
          { class: s.health === "unhealthy" ? "bad" : "good" },
          s.health === "unhealthy" ? "⚠ unhealthy" : "healthy",
          s.health_reason ? h("div", { class: "reason" }, s.health_reason) : null,
        ),
        h("td", {}, duration(now - s.created_at_unix * 1000)),
        h("td", {}, left === null ? "none" : duration(left)),
        h("td", {}, cpu === null ? "–" : `${cpu.toFixed(0)}% of ${s.vcpus}`),
        h("td", {}, `${bytes(usage?.memory_bytes)} / ${s.memory_limit_mib ? `${s.memory_limit_mib} MiB` : `${s.memory_mib} MiB`}`),
        h("td", { class: "mono" }, egress),
        h("td", { class: "actions" }, ...sandboxActions(s, true)),
      );
    }),
  );
}

function sandboxActions(s: Sandbox, compact: boolean): HTMLElement[] {
  const label = (what: string) => ({ "aria-label": `${what} ${s.id}` });
  const out: HTMLElement[] = [
    button("Terminal", () => openTerminal(s.id), label("Open a terminal on")),
    button("Files", () => openFiles(s.id), label("Browse the files of")),
    button("Kill", () => kill(s.id), { ...label("Kill"), class: "danger" }),
  ];
  if (!compact) {
    const mode = h(
      "select",
      { id: `branch-mode-${s.id}`, "aria-label": "BRANCH mode" },
      h("option", { value: "full" }, "full"),
      h("option", { value: "diff" }, "diff"),
      h("option", { value: "live" }, "live"),
    );
    const n = h("input", {
      id: `fork-live-n-${s.id}`,
      type: "number",
      min: 1,
      max: 16,
      value: 1,
      "aria-label": "Children to fork live",
      class: "narrow",
    });
    out.push(
      h(
        "span",
        { class: "group" },
        mode,
        button("BRANCH", () => branch(s.id, (mode as HTMLSelectElement).value), label("BRANCH")),
      ),
      h(
        "span",
        { class: "group" },
        n,
        button("Fork live", () => forkLive(s.id, Number(n.value)), label("Fork live from")),
      ),
    );
  } else {
    out.push(button("More", () => select({ kind: "sandbox", id: s.id }), label("Show BRANCH and fork-live for")));
  }
  return out;
}

async function openTerminal(id: string): Promise<void> {
  location.hash = "#terminal";
  await terminal.open(id);
}

async function openFiles(id: string): Promise<void> {
  location.hash = "#terminal";
  await files.show(id);
}

async function kill(id: string): Promise<void> {
  if (!confirm(`Kill sandbox ${id}?`)) return;
  await call("DELETE", `/v1/sandboxes/${enc(id)}`);
  notify(`killed ${id}`);
  refreshSoon();
}

async function branch(id: string, mode: string): Promise<void> {
  const snap = await call<Snapshot>("POST", `/v1/sandboxes/${enc(id)}/branch`, { mode, wait: false });
  notify(`BRANCH ${mode} of ${id}: ${snap.tag} (${snap.status}, paused ${snap.pause_ms ?? "?"} ms)`);
  refreshSoon();
}

async function forkLive(id: string, n: number): Promise<void> {
  const res = await call<{ tag: string; sandboxes: Sandbox[]; source_pause_ms: number }>("POST", `/v1/sandboxes/${enc(id)}/fork`, { n });
  notify(`forked ${res.sandboxes.length} live from ${id} (capture ${res.tag}, source paused ${Math.round(res.source_pause_ms)} ms)`);
  refreshSoon();
}

async function fork(tag: string, n: number): Promise<void> {
  const children = await call<Sandbox[]>("POST", "/v1/sandboxes", { snapshot_tag: tag, n });
  notify(`forked ${children.map((c) => c.id).join(", ")} from ${tag}`);
  refreshSoon();
}

async function removeSnapshot(tag: string): Promise<void> {
  // Dependents named first: the user sees what else goes before anything is removed.
  const info = await call<SnapshotInfo>("GET", `/v1/snapshots/${enc(tag)}/info`);
  const running = state.sandboxes.filter((s) => s.snapshot_tag === tag || info.dependents.includes(s.snapshot_tag ?? "")).map((s) => s.id);
  const what = [
    info.dependents.length ? `its dependents ${info.dependents.join(", ")}` : "",
    running.length ? `the sandboxes ${running.join(", ")}` : "",
  ].filter(Boolean);
  if (!confirm(`Remove snapshot ${tag}${what.length ? ` and ${what.join(" and ")}` : ""}?`)) return;
  const q = [info.dependents.length ? "cascade=true" : "", running.length ? "force=true" : ""].filter(Boolean).join("&");
  await call("DELETE", `/v1/snapshots/${enc(tag)}${q ? `?${q}` : ""}`);
  notify(`removed ${tag}${what.length ? ` and ${what.join(" and ")}` : ""}`);
  state.selected = undefined;
  refreshSoon();
}

async function pack(tag: string, name: string): Promise<void> {
  const job = await call<Job>("POST", `/v1/snapshots/${enc(tag)}/pack`, { path: name });
  notify(`packing ${tag} to ${name}: job ${job.id}`);
  refreshSoon();
}

async function push(tag: string, ref: string): Promise<void> {
  const job = await call<Job>("POST", `/v1/snapshots/${enc(tag)}/push`, { ref });
  notify(`pushing ${tag} to ${ref}: job ${job.id}`);
  refreshSoon();
}

async function pull(ref: string, tag: string): Promise<void> {
  const job = await call<Job>("POST", "/v1/snapshots/pull", { ref, ...(tag ? { tag } : {}) });
  notify(`pulling ${ref}${tag ? ` as ${tag}` : ""}: job ${job.id}`);
  refreshSoon();
}

function select(sel: Selection): void {
  state.selected = sel;
  tree.select(sel);
  renderInfo().catch((e: unknown) => notify(errorText(e), "error"));
}

function dl(...pairs: [string, Node | string | number | null | undefined][]): HTMLElement {
  return h("dl", {}, ...pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v === null || v === undefined ? "–" : v)]));
}

let infoSeq = 0;
async function renderInfo(): Promise<void> {
  const sel = state.selected;
  const seq = ++infoSeq;
  if (!sel) return;
  if (sel.kind === "sandbox") {
    const s = state.sandboxes.find((x) => x.id === sel.id);
    if (!s) {
      infoEl.replaceChildren(h("p", { class: "muted" }, `Sandbox ${sel.id} is gone.`));
      return;
    }
    infoEl.replaceChildren(
      h("h3", {}, "Sandbox ", h("span", { class: "mono" }, s.id)),
      dl(
        ["State", s.state],
        ["Health", s.health === "unhealthy" ? `unhealthy: ${s.health_reason ?? ""}` : "healthy"],
        ["Snapshot", s.snapshot_tag],
        ["Address", s.guest_addr],
        ["Memory", `${s.memory_mib} MiB${s.memory_limit_mib ? ` (limit ${s.memory_limit_mib} MiB)` : ""}`],
        ["vCPUs", s.vcpus],
        ["Age", duration(Date.now() - s.created_at_unix * 1000)],
        ["BRANCHes", s.branch_count],
      ),
      h("div", { class: "actions" }, ...sandboxActions(s, false)),
    );
    return;
  }
  const byTag = new Map(state.snapshots.map((x) => [x.tag, x]));
  const s = byTag.get(sel.tag);
  if (!s) {
    infoEl.replaceChildren(h("p", { class: "muted" }, `Snapshot ${sel.tag} is gone.`));
    return;
  }
  const info =
    s.status === "ready" ? await call<SnapshotInfo>("GET", `/v1/snapshots/${enc(s.tag)}/info`).catch(() => undefined) : undefined;
  if (seq !== infoSeq) return;
  const n = h("input", { id: "fork-n", type: "number", min: 1, max: 64, value: 1, class: "narrow" });
  const packName = h("input", { id: "pack-name", type: "text", value: `${s.tag}.forkdpack`, spellcheck: "false" });
  const pushRef = h("input", { id: "push-ref", type: "text", placeholder: "oci://registry/repo:tag", spellcheck: "false" });
  const actions =
    s.status === "ready"
      ? [
          h(
            "span",
            { class: "group" },
            h("label", { for: "fork-n" }, "Children"),
            n,
            button("Fork", () => fork(s.tag, Number(n.value)), { "aria-label": `Fork from ${s.tag}` }),
          ),
          h(
            "span",
            { class: "group" },
            h("label", { for: "pack-name" }, "Pack file"),
            packName,
            button("Pack", () => pack(s.tag, packName.value.trim())),
          ),
          h(
            "span",
            { class: "group" },
            h("label", { for: "push-ref" }, "Push to"),
            pushRef,
            button("Push", () => push(s.tag, pushRef.value.trim()), { "aria-label": `Push ${s.tag}` }),
          ),
          button("Remove…", () => removeSnapshot(s.tag), { class: "danger", "aria-label": `Remove snapshot ${s.tag}` }),
        ]
      : [];
  const from = s.branched_from;
  infoEl.replaceChildren(
    h("h3", {}, "Snapshot ", h("span", { class: "mono" }, s.tag)),
    dl(
      ["Status", s.status === "failed" ? `failed: ${s.error ?? s.warning ?? ""}` : s.status],
      ["Layer", layerKind(s)],
      ["Parent", s.parent ?? null],
      ["Chain depth", info?.chain_depth ?? chainDepth(s.tag, byTag)],
      ["Memory (logical)", bytes(info?.logical_bytes ?? s.memory_bytes)],
      ["Stored (physical)", bytes(info?.physical_bytes ?? s.physical_bytes)],
      ["BRANCH of", from ? `${from} at ${s.created_at ?? new Date(s.created_at_unix * 1000).toISOString()}` : null],
      ["Source paused", s.pause_ms !== undefined ? `${s.pause_ms} ms` : null],
      ["Image", s.image],
      ["Dependents", info ? info.dependents.join(", ") || "none" : null],
    ),
    h("div", { class: "actions" }, ...actions),
  );
}

function renderPoolsAndJobs(): void {
  clear(poolsEl);
  poolsEl.append(
    state.pools.length
      ? h(
          "table",
          {},
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Snapshot"),
              h("th", { scope: "col" }, "Ready / target"),
              h("th", { scope: "col" }, "Starting"),
            ),
          ),
          h(
            "tbody",
            {},
            ...state.pools.map((p) =>
              h(
                "tr",
                {},
                h("td", {}, p.tag),
                h(
                  "td",
                  {},
                  h("meter", { min: 0, max: Math.max(1, p.size), value: p.ready, "aria-label": `pool ${p.tag}` }),
                  ` ${p.ready} / ${p.size}`,
                ),
                h("td", {}, p.starting),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No hot pools."),
  );
  clear(jobsEl);
  const jobs = [...state.jobs].sort((a, b) => b.created_at.localeCompare(a.created_at)).slice(0, 20);
  jobsEl.append(
    jobs.length
      ? h(
          "ul",
          { class: "jobs" },
          ...jobs.map((j) =>
            h(
              "li",
              {},
              `${j.kind} ${j.id}: ${j.status} (${j.progress.step}) `,
              h("progress", {
                max: Math.max(1, j.progress.total_bytes),
                value: j.status === "succeeded" ? Math.max(1, j.progress.total_bytes) : j.progress.done_bytes,
                "aria-label": `${j.kind} ${j.id} progress`,
              }),
              j.error ? h("span", { class: "bad" }, ` ${j.error.code}: ${j.error.message}`) : null,
            ),
          ),
        )
      : h("p", { class: "muted" }, "No jobs."),
  );
}

async function start(): Promise<void> {
  if (!storedToken()) {
    loginView();
    return;
  }
  try {
    await call("GET", "/v1/pools");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      storeToken(null);
      loginView("That token was refused.");
      return;
    }
    throw e;
  }
  layout();
  await refresh();
  await refreshMetrics().catch(() => {});
  stopEvents = eventStream(
    (type, data) => {
      if (type === "metrics") takeMetrics(data as MetricsSummary);
      else if (type !== "hello") refreshSoon();
      if (type === "sandbox.unhealthy") {
        const d = data as { id: string; reason: string | null };
        notify(`sandbox ${d.id} is unhealthy: ${d.reason ?? ""}`, "error");
      }
    },
    (connected) => {
      connEl.textContent = connected ? "● live" : "○ reconnecting…";
      connEl.className = connected ? "conn good" : "conn bad";
    },
  );
  document.body.dataset.ready = "true";
}

takeTokenFromFragment();
start().catch((e: unknown) => {
  console.error(e instanceof Error ? e.stack : e);
  loginView(errorText(e));
});
