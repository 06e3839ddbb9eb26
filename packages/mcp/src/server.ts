// forkd's MCP tools (forkd-mcp 0.2.0: the same 11 names and argument names) plus
// file tools, each one call (or a loop of them) on the daemon through the SDK's Controller.
import { setTimeout as sleep } from "node:timers/promises";
import { type Controller, ForkdApiError } from "@forkd/sdk";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import type { CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";
import { Progress, type ToolExtra } from "./progress.js";

const SERVER_NAME = "forkd";
const SERVER_VERSION = "0.1.0";

/** Fork, BRANCH and snapshot builds can take minutes on a busy host; the short-call timeout would cut them off. */
const LONG_CALL_MS = 15 * 60_000;
/** forkd's wait_for_text reads the last 4 KiB of the file each poll. */
const TAIL_BYTES = 4096;
const EXCERPT_CHARS = 256;
/** tail is not in the image (exit 127). */
const NO_TAIL = "\u0000no-tail";

const INSTRUCTIONS = `forkd runs code in microVM sandboxes forked copy-on-write from warm snapshots.
Typical flow: list_snapshots (or create_snapshot) -> spawn_sandboxes -> exec_command / eval_code / write_file / read_file -> branch_sandbox to fork a running sandbox's state into a new snapshot -> kill_sandbox when done.`;

const sandboxId = z.string().min(1).describe("Sandbox id, as spawn_sandboxes or list_sandboxes return it (e.g. sb-…)");
const tagName = (what: string) => z.string().min(1).max(64).describe(what);

/**
 * A dict becomes one JSON text; a list one JSON text per element and
 * structuredContent `{result: [...]}`, as forkd-mcp (FastMCP) answers. An empty
 * list says `[]` rather than nothing, so a model reading it sees an answer.
 */
export function toolResult(value: unknown, notes: string[] = []): CallToolResult {
  const text = (v: unknown) => ({ type: "text" as const, text: JSON.stringify(v, null, 2) ?? "null" });
  const noteContent = notes.map((n) => ({ type: "text" as const, text: n }));
  if (Array.isArray(value)) {
    return {
      content: [...(value.length ? value.map(text) : [text([])]), ...noteContent],
      structuredContent: { result: value },
    };
  }
  const structured = value && typeof value === "object" ? (value as Record<string, unknown>) : { result: value };
  return { content: [text(value), ...noteContent], structuredContent: structured };
}

/** A daemon failure as the model should see it: what happened, the stable code, and what to do next. */
export function errorResult(err: unknown): CallToolResult {
  if (err instanceof ForkdApiError) {
    const lines = [
      err.status ? `forkd daemon answered ${err.status} ${err.code}: ${err.message}` : `${err.code}: ${err.message}`,
      ...(err.remediation ? [`remediation: ${err.remediation}`] : []),
      ...(err.details ? [`details: ${JSON.stringify(err.details)}`] : []),
    ];
    return { content: [{ type: "text", text: lines.join("\n") }], structuredContent: err.toJSON(), isError: true };
  }
  const message = err instanceof Error ? err.message : String(err);
  return { content: [{ type: "text", text: message }], structuredContent: { error: message, code: "internal" }, isError: true };
}

/** Our daemon answered lists wrapped (`{sandboxes: [...]}`) before it took forkd's bare arrays; accept both. */
function bareList(body: unknown, key: string, more?: string): unknown[] {
  if (Array.isArray(body)) return body;
  const obj = (body ?? {}) as Record<string, unknown>;
  const list = Array.isArray(obj[key]) ? (obj[key] as unknown[]) : [];
  return more && Array.isArray(obj[more]) ? [...list, ...(obj[more] as unknown[])] : list;
}

type Defined<T> = { [K in keyof T]?: Exclude<T[K], null | undefined> };

/** Only the fields a caller set, so a default never reaches the daemon as an explicit value. */
function defined<T extends Record<string, unknown>>(obj: T): Defined<T> {
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined && v !== null)) as Defined<T>;
}

function lastChars(text: string, n: number): string {
  const chars = Array.from(text);
  return chars.length <= n ? text : chars.slice(-n).join("");
}

export type ForkdMcpOpts = { client: Controller };

export function createForkdMcpServer({ client }: ForkdMcpOpts): McpServer {
  const server = new McpServer({ name: SERVER_NAME, version: SERVER_VERSION }, { capabilities: { tools: {} }, instructions: INSTRUCTIONS });

  // Every tool answers; a daemon error or a bug becomes a tool error, never a
  // failed JSON-RPC call, so the model can read what went wrong and go on.
  const tool = <Shape extends z.ZodRawShape>(
    name: string,
    config: { title: string; description: string; annotations?: Record<string, boolean> },
    shape: Shape,
    run: (args: z.infer<z.ZodObject<Shape>>, extra: ToolExtra) => Promise<CallToolResult>,
  ) => {
    server.registerTool(name, { ...config, inputSchema: z.object(shape).strict() }, async (args: unknown, extra: ToolExtra) => {
      try {
        return await run(args as z.infer<z.ZodObject<Shape>>, extra);
      } catch (err) {
        return errorResult(err);
      }
    });
  };

  const readOnly = { readOnlyHint: true, openWorldHint: false };

  tool(
    "list_snapshots",
    {
      title: "List snapshots",
      description:
        "List the warm snapshots sandboxes can be spawned from (tag, image, memory, parent for BRANCHed ones). BRANCHes still being written are listed last with status 'writing' (or 'failed').",
      annotations: readOnly,
    },
    {},
    async (_args, extra) => toolResult(bareList(await client.listSnapshots({ signal: extra.signal }), "snapshots", "pending")),
  );

  tool(
    "spawn_sandboxes",
    {
      title: "Spawn sandboxes",
      description:
        "Fork n sandboxes from a snapshot (copy-on-write restore, typically well under a second each). Returns one sandbox object per child with its id. If any child fails, the others of the call are killed and the call fails.",
    },
    {
      snapshot_tag: tagName("Snapshot to fork from (see list_snapshots)"),
      n: z.number().int().min(1).max(1000).default(1).describe("How many sandboxes (1..1000)"),
      per_child_netns: z
        .boolean()
        .default(false)
        .describe("forkd's per-child network namespace; accepted for compatibility (every forkd-ts sandbox has its own network already)"),
      memory_limit_mib: z
        .number()
        .int()
        .positive()
        .optional()
        .describe("cgroup memory limit of each sandbox's VMM in MiB (at least 64); none by default, unlike forkd-mcp's 256"),
      prewarm: z
        .boolean()
        .default(false)
        .describe("forkd: fault pages in after restore; accepted, no effect here (children are always restored warm)"),
      live_fork: z
        .boolean()
        .default(false)
        .describe(
          "forkd: memfd-backed RAM for live BRANCH; accepted, no effect here (guest RAM is always shared memory, live BRANCH always works)",
        ),
      hugepages: z.boolean().default(false).describe("forkd: huge pages with live_fork; accepted, no effect here"),
      network: z.boolean().optional().describe("false: no network at all. Default: the daemon's egress policy (public internet only)"),
      allow_out: z.array(z.string()).optional().describe("Egress exceptions: IP, CIDR, IP:PORT or CIDR:PORT (wins over deny_out)"),
      deny_out: z.array(z.string()).optional().describe("Destinations the default policy allows that these sandboxes may not reach"),
      cpu_limit: z.number().positive().optional().describe("CPUs each sandbox may use (fractions allowed, e.g. 0.5); its vCPUs by default"),
      timeout_ms: z.number().int().positive().optional().describe("Kill each sandbox this long after it starts"),
      metadata: z.record(z.string(), z.string()).optional().describe("Labels kept with each sandbox"),
    },
    async (args, extra) => {
      const body = {
        snapshot_tag: args.snapshot_tag,
        n: args.n,
        ...defined({
          // forkd's flags are sent only when set: false is what the daemon assumes anyway.
          per_child_netns: args.per_child_netns || undefined,
          prewarm: args.prewarm || undefined,
          live_fork: args.live_fork || undefined,
          hugepages: args.hugepages || undefined,
          memory_limit_mib: args.memory_limit_mib,
          network: args.network,
          allow_out: args.allow_out,
          deny_out: args.deny_out,
          cpu_limit: args.cpu_limit,
          timeout_ms: args.timeout_ms,
          metadata: args.metadata,
        }),
      };
      const progress = new Progress(extra);
      const res = await progress.during(
        client.createSandboxes(body, { timeoutMs: LONG_CALL_MS, signal: extra.signal }),
        `forking ${args.n} sandbox${args.n === 1 ? "" : "es"} from ${args.snapshot_tag}`,
      );
      return toolResult(bareList(res, "sandboxes"));
    },
  );

  tool(
    "branch_sandbox",
    {
      title: "BRANCH a sandbox",
      description:
        "Snapshot a running sandbox into a new tag (pause a few ms, capture, resume) so more sandboxes can be spawned from its current state. mode: full, diff (only changed pages) or live (background copy); wait:false answers as soon as the source runs again, with status 'writing'.",
    },
    {
      sandbox_id: sandboxId,
      tag: tagName("New snapshot tag ([A-Za-z0-9_-]{1,64}); generated when omitted").nullable().optional(),
      diff: z.boolean().default(false).describe("forkd's legacy flag for mode 'diff'"),
      live: z.boolean().default(false).describe("forkd's legacy flag for mode 'live'"),
      measure_diff: z
        .boolean()
        .default(false)
        .describe("forkd: a full snapshot plus a throwaway diff for timing; accepted, no effect here (every BRANCH reports its pause)"),
      mode: z.enum(["full", "diff", "live"]).nullable().optional().describe("Capture mode; the daemon's default when omitted"),
      wait: z.boolean().default(true).describe("false: answer once the sandbox resumes, while the snapshot is still being written"),
      parent_tag: z.string().nullable().optional().describe("forkd chain edge: must be the source sandbox's snapshot tag (diff mode)"),
    },
    async (args, extra) => {
      const body = defined({
        tag: args.tag,
        mode: args.mode,
        diff: args.diff || undefined,
        live: args.live || undefined,
        measure_diff: args.measure_diff || undefined,
        wait: args.wait ? undefined : false,
        parent_tag: args.parent_tag,
      });
      const progress = new Progress(extra);
      const res = await progress.during(
        client.branchSandbox(args.sandbox_id, body, { timeoutMs: LONG_CALL_MS, signal: extra.signal }),
        `BRANCH of ${args.sandbox_id}`,
      );
      return toolResult(res);
    },
  );

  tool(
    "create_snapshot",
    {
      title: "Create a snapshot",
      description:
        "Boot a VM from a guest image (default 'base'), run the warm-up commands, and save it as a warm snapshot under `tag`. forkd's kernel/rootfs/rw/tap/boot_wait_secs are accepted for compatibility but not used: forkd-ts boots from its built images (see `forkd image ls`).",
    },
    {
      tag: tagName("New snapshot tag ([A-Za-z0-9_-]{1,64})"),
      image: z.string().min(1).optional().describe("Guest image to boot (e.g. base, python); the daemon's default is base"),
      warm: z.array(z.string()).max(64).optional().describe("Shell commands run in the VM before it is snapshotted"),
      warm_eval: z.array(z.string()).max(64).optional().describe("Code evaluated in the warm runtime before the snapshot"),
      memory_mib: z.number().int().positive().optional().describe("Guest RAM in MiB"),
      vcpus: z.number().int().positive().optional().describe("Guest vCPUs"),
      kernel: z.string().optional().describe("forkd: host path of a kernel; ignored by forkd-ts"),
      rootfs: z.string().optional().describe("forkd: host path of a root filesystem; ignored by forkd-ts"),
      rw: z.boolean().default(false).describe("forkd: boot the rootfs read-write; ignored by forkd-ts"),
      tap: z.string().nullable().optional().describe("forkd: host tap device; ignored by forkd-ts"),
      boot_wait_secs: z
        .number()
        .int()
        .min(0)
        .max(60)
        .default(10)
        .describe("forkd: seconds to wait after boot; forkd-ts waits for its agent instead"),
    },
    async (args, extra) => {
      const body = {
        tag: args.tag,
        ...defined({
          image: args.image,
          warm: args.warm,
          warm_eval: args.warm_eval,
          memory_mib: args.memory_mib,
          vcpus: args.vcpus,
        }),
      };
      const ignored = [args.kernel && "kernel", args.rootfs && "rootfs", args.rw && "rw", args.tap && "tap"].filter(Boolean);
      const progress = new Progress(extra);
      const res = await progress.during(
        client.createSnapshot(body, { timeoutMs: LONG_CALL_MS, signal: extra.signal }),
        `snapshot ${args.tag} from image ${args.image ?? "base"}`,
      );
      const notes = ignored.length
        ? [`note: ${ignored.join(", ")} ignored; forkd-ts booted its '${args.image ?? "base"}' image (pass image to choose another)`]
        : [];
      return toolResult(res, notes);
    },
  );

  tool(
    "wait_for_text",
    {
      title: "Wait for text in a file",
      description:
        "Poll a file in the sandbox until `marker` appears in its last 4 KiB, or until timeout_secs. Returns {found, elapsed_ms, last_excerpt} (the last 256 characters read). A missing file counts as empty.",
      annotations: readOnly,
    },
    {
      sandbox_id: sandboxId,
      path: z.string().min(1).describe("File in the sandbox, e.g. a log a background command writes"),
      marker: z.string().describe("Text to wait for"),
      timeout_secs: z.number().min(0).max(3600).default(60).describe("Give up after this many seconds"),
      poll_interval_ms: z.number().int().min(10).max(60_000).default(200).describe("Pause between reads"),
    },
    async (args, extra) => {
      const progress = new Progress(extra);
      const started = performance.now();
      const timeoutMs = args.timeout_secs * 1000;
      const elapsed = () => Math.round(performance.now() - started);
      // The marker may straddle the window's start: read enough to hold it whole.
      const window = TAIL_BYTES + Buffer.byteLength(args.marker);
      // An argv, never a shell line: the path reaches tail as one argument, and
      // `--` keeps a path that starts with '-' from being read as an option.
      const tailByExec = async () => {
        const res: { stdout?: unknown; exit_code?: unknown } = await client.exec(
          args.sandbox_id,
          { argv: ["tail", "-c", String(window), "--", args.path], timeout_ms: 5000 },
          { signal: extra.signal },
        );
        if (res?.exit_code === 127) return NO_TAIL;
        return typeof res?.stdout === "string" ? res.stdout : "";
      };
      // An image without tail (a custom root): read the whole file through the files API instead.
      const tailByRead = async () => {
        try {
          const res = await client.files<{ data?: string }>(args.sandbox_id, { action: "read", path: args.path }, { signal: extra.signal });
          const bytes = Buffer.from(res?.data ?? "", "base64");
          return bytes.subarray(Math.max(0, bytes.length - window)).toString("utf8");
        } catch (err) {
          // Not there yet is an empty file, as forkd's `tail … || true` has it.
          if (err instanceof ForkdApiError && err.code === "not_found") return "";
          throw err;
        }
      };
      let excerpt = "";
      let haveTail = true;
      for (;;) {
        excerpt = haveTail ? await tailByExec() : await tailByRead();
        if (excerpt === NO_TAIL) {
          haveTail = false;
          excerpt = await tailByRead();
        }
        if (excerpt.includes(args.marker))
          return toolResult({ found: true, elapsed_ms: elapsed(), last_excerpt: lastChars(excerpt, EXCERPT_CHARS) });
        if (elapsed() + args.poll_interval_ms >= timeoutMs) break;
        await progress.report(elapsed(), `waiting for the marker in ${args.path}`, timeoutMs);
        await sleep(args.poll_interval_ms, undefined, { signal: extra.signal });
      }
      return toolResult({ found: false, elapsed_ms: elapsed(), last_excerpt: lastChars(excerpt, EXCERPT_CHARS) });
    },
  );

  tool(
    "list_sandboxes",
    { title: "List sandboxes", description: "List the live sandboxes (id, snapshot_tag, state, health, limits).", annotations: readOnly },
    {},
    async (_args, extra) => toolResult(bareList(await client.listSandboxes({ signal: extra.signal }), "sandboxes")),
  );

  tool(
    "get_sandbox",
    { title: "Get a sandbox", description: "One sandbox's details.", annotations: readOnly },
    { sandbox_id: sandboxId },
    async (args, extra) => toolResult(await client.getSandbox(args.sandbox_id, { signal: extra.signal })),
  );

  tool(
    "kill_sandbox",
    {
      title: "Kill a sandbox",
      description: "Stop a sandbox and free its memory. Returns {id, killed: true}.",
      annotations: { destructiveHint: true, idempotentHint: false, openWorldHint: false },
    },
    { sandbox_id: sandboxId },
    async (args, extra) => {
      await client.deleteSandbox(args.sandbox_id, { signal: extra.signal });
      return toolResult({ id: args.sandbox_id, killed: true });
    },
  );

  tool(
    "exec_command",
    {
      title: "Run a command",
      description:
        'Run a command in a sandbox and wait for it: `args` is an argv (no shell; use ["sh","-c","…"] for one). Returns {stdout, stderr, exit_code} plus signal, timed_out, duration_ms and truncated.',
    },
    {
      sandbox_id: sandboxId,
      args: z.array(z.string()).min(1).describe('argv, e.g. ["ls","-la","/tmp"]'),
      timeout_secs: z.number().int().min(1).max(3600).default(30).describe("Kill the command after this many seconds"),
      env: z.record(z.string(), z.string()).optional().describe("Extra environment variables"),
      cwd: z.string().optional().describe("Working directory"),
      stdin: z.string().optional().describe("Text fed to the command's standard input"),
    },
    async (args, extra) => {
      const body = {
        argv: args.args,
        timeout_ms: args.timeout_secs * 1000,
        ...defined({ env: args.env, cwd: args.cwd, stdin: args.stdin }),
      };
      // The daemon answers when the command ends: its timeout plus slack for the round trip.
      const res = await client.exec(args.sandbox_id, body, {
        timeoutMs: args.timeout_secs * 1000 + 30_000,
        signal: extra.signal,
      });
      return toolResult(res);
    },
  );

  tool(
    "eval_code",
    {
      title: "Evaluate code",
      description:
        "Evaluate code in the sandbox's warm runtime (JavaScript for the base image, Python for the python image); state persists between calls in the same sandbox.",
    },
    {
      sandbox_id: sandboxId,
      code: z.string().describe("Code to evaluate; the value of the last expression is returned"),
      language: z.enum(["javascript", "python"]).optional().describe("Runtime; the image's main one by default"),
      timeout_ms: z.number().int().positive().max(3_600_000).optional().describe("Give up on the evaluation after this long"),
    },
    async (args, extra) => {
      const body = { code: args.code, ...defined({ language: args.language, timeout_ms: args.timeout_ms }) };
      const res = await client.eval(args.sandbox_id, body, {
        timeoutMs: (args.timeout_ms ?? client.requestTimeoutMs) + 30_000,
        signal: extra.signal,
      });
      return toolResult(res);
    },
  );

  tool(
    "ping_sandbox",
    { title: "Ping a sandbox", description: "Check that a sandbox's guest agent answers.", annotations: readOnly },
    { sandbox_id: sandboxId },
    async (args, extra) => toolResult(await client.ping(args.sandbox_id, { signal: extra.signal })),
  );

  tool(
    "read_file",
    {
      title: "Read a file",
      description:
        "Read a file from a sandbox. Returns {path, size, encoding, content}; a file that is not valid UTF-8 comes back base64-encoded whatever encoding was asked.",
      annotations: readOnly,
    },
    {
      sandbox_id: sandboxId,
      path: z.string().min(1).describe("Absolute path in the sandbox"),
      encoding: z.enum(["utf8", "base64"]).default("utf8").describe("How to return the content"),
    },
    async (args, extra) => {
      const res = await client.files<{ path?: string; size?: number; data?: string }>(
        args.sandbox_id,
        { action: "read", path: args.path },
        { signal: extra.signal },
      );
      const bytes = Buffer.from(res.data ?? "", "base64");
      let encoding = args.encoding;
      let content = res.data ?? "";
      if (encoding === "utf8") {
        try {
          content = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
        } catch {
          encoding = "base64";
        }
      }
      return toolResult({ path: res.path ?? args.path, size: res.size ?? bytes.length, encoding, content });
    },
  );

  tool(
    "write_file",
    {
      title: "Write a file",
      description:
        "Write a file in a sandbox (atomically: a reader never sees half of it); the directory must exist. Returns {path, size}.",
    },
    {
      sandbox_id: sandboxId,
      path: z.string().min(1).describe("Absolute path in the sandbox"),
      content: z.string().describe("The file's content"),
      encoding: z.enum(["utf8", "base64"]).default("utf8").describe("How `content` is encoded"),
      mode: z.number().int().min(0).max(0o7777).optional().describe("File mode, e.g. 493 (0755)"),
    },
    async (args, extra) => {
      const res = await client.files(
        args.sandbox_id,
        { action: "write", path: args.path, data: args.content, ...defined({ encoding: args.encoding, mode: args.mode }) },
        { signal: extra.signal },
      );
      return toolResult(res);
    },
  );

  tool(
    "list_files",
    { title: "List a directory", description: "List a directory in a sandbox: {path, entries}.", annotations: readOnly },
    { sandbox_id: sandboxId, path: z.string().min(1).describe("Absolute directory path in the sandbox") },
    async (args, extra) => toolResult(await client.files(args.sandbox_id, { action: "list", path: args.path }, { signal: extra.signal })),
  );

  return server;
}
