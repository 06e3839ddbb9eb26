// Every setting forkd takes from its environment, in one table (SETTINGS): the
// variable, its type, default, what is allowed and what it does. The README's
// configuration section is generated from it (`npm run docs:settings`).
//
// A value is parsed and checked here, once for each value its variable takes; a
// bad one is an `invalid_setting` error naming the variable, the value and what is
// allowed, never a silent default. Nothing else in forkd's host packages reads
// process.env (biome's noProcessEnv, biome.json): the daemon and the CLI hand down
// what their flags decide with configureSettings, and a child process forkd starts
// gets its settings from settingsEnv.
//
// The variables are read when a setting is asked for, not once at start-up, and
// a value is cached with the raw text it came from: tests point FORKD_HOME and
// FORKD_RUN_DIR at a scratch store per file after core is loaded. zod is loaded
// only when a variable that needs parsing is set (a number, a choice, a list; not
// PATH, text or a path): a CLI command on a host that sets none does not pay for it
// (loading zod measured 170 ms of CPU on this loaded 2-core machine, undici 275).
import { createRequire } from "node:module";
import path from "node:path";
import type { z as Zod, ZodType } from "zod";
import { ForkdError } from "./errors.js";

type Z = typeof Zod;
let zod: Z | undefined;
function loadZod(): Z {
  zod ??= (createRequire(import.meta.url)("zod") as { z: Z }).z;
  return zod;
}

type SettingGroup = "state" | "vm" | "limits" | "registry" | "cluster" | "client" | "development";

export type SettingSpec<T> = {
  /** The environment variable. */
  env: string;
  group: SettingGroup;
  /** What kind of value, in words: "path", "integer", "on | off"… */
  type: string;
  /** The value when the variable is unset or empty. */
  default: T;
  /** How the README shows the default when `default` does not say it (computed, or unset meaning something). */
  shownDefault?: string;
  /** What is allowed, in words: the error for a bad value quotes it. */
  allowed: string;
  description: string;
  /** Parses a non-empty raw value (built when first needed: zod loads lazily). */
  schema: (z: Z) => ZodType<T>;
  /** Never echoed in an error (a password, a token). */
  secret?: boolean;
  /** An empty value is a value, not "unset". */
  keepsEmpty?: boolean;
  /** The value as its variable would spell it, for a child process (String(value) unless given). */
  toEnv?: (value: NonNullable<T>) => string;
};

function required<T>(spec: SettingSpec<T>): SettingSpec<T> {
  return spec;
}

function optional<T>(
  spec: Omit<SettingSpec<T | undefined>, "default" | "schema" | "toEnv"> & { schema: (z: Z) => ZodType<T>; toEnv?: (value: T) => string },
): SettingSpec<T | undefined> {
  return {
    ...spec,
    default: undefined,
    schema: spec.schema as (z: Z) => ZodType<T | undefined>,
    ...(spec.toEnv ? { toEnv: spec.toEnv as (value: NonNullable<T | undefined>) => string } : {}),
  };
}

/** A path, made absolute against the working directory as the OS would. */
const resolvedPath = (z: Z) => z.string().transform((p) => path.resolve(p));
/** Any text: taken as it is, without loading zod (PATH is set in every process). */
const anyText = (z: Z) => z.string();
const plainPath = anyText;
const text = anyText;
const positiveNumber = (z: Z) => z.coerce.number().positive();
const positiveInteger = (z: Z) => z.coerce.number().int().positive();
const onOff = (z: Z) => z.enum(["on", "off"]);

const commaList = (z: Z) =>
  z.string().transform((s) =>
    s
      .split(",")
      .map((item) => item.trim())
      .filter(Boolean),
  );

/** Colon-separated like PATH; every entry absolute (a relative one would hide nothing, or the wrong thing). */
const absolutePathList = (z: Z) =>
  z
    .string()
    .transform((s) => s.split(":").filter(Boolean))
    .refine((paths) => paths.every((p) => path.isAbsolute(p)))
    .transform((paths) => paths.map((p) => path.resolve(p)));

const DAEMON_URL_RE = /^(https?:\/\/[^\s/]+\/*|unix:\/\S+)$/;

/** forkd's settings. Order is the README's: grouped, then as a reader meets them. */
export const SETTINGS = {
  home: required({
    env: "FORKD_HOME",
    group: "state",
    type: "path",
    default: "/var/lib/forkd",
    allowed: "a path",
    description: "durable state: images, snapshots, the database, the daemon's token and audit log",
    schema: resolvedPath,
  }),
  runDir: required({
    env: "FORKD_RUN_DIR",
    group: "state",
    type: "path",
    default: "/run/forkd",
    allowed: "a path",
    description: "runtime state gone after a reboot: the daemon's socket, each VM's sockets, pid and console log",
    schema: resolvedPath,
  }),
  shmDir: required({
    env: "FORKD_SHM_DIR",
    group: "state",
    type: "path",
    default: "/dev/shm/forkd",
    allowed: "a path on shmem (live BRANCH needs it)",
    description: "staged memory images, which children map",
    schema: resolvedPath,
  }),
  stageBudgetMib: required({
    env: "FORKD_STAGE_BUDGET_MIB",
    group: "state",
    type: "MiB",
    default: 8192,
    allowed: "a number above 0",
    description: "how much staged memory images may take before the least recently used idle one is evicted",
    schema: positiveNumber,
  }),
  qemu: optional({
    env: "FORKD_QEMU",
    group: "vm",
    type: "path",
    shownDefault: "`/usr/bin/qemu-system-x86_64-microvm` (KVM), `/usr/bin/qemu-system-x86_64` (TCG)",
    allowed: "a path",
    description: "the QEMU binary",
    schema: plainPath,
  }),
  accel: optional({
    env: "FORKD_ACCEL",
    group: "vm",
    type: "kvm | tcg",
    shownDefault: "KVM where a probe guest boots under it, else TCG",
    allowed: "kvm or tcg",
    description: "the accelerator, instead of probing (`--accel` wins)",
    schema: (z) => z.enum(["kvm", "tcg"]),
  }),
  kernel: optional({
    env: "FORKD_KERNEL",
    group: "vm",
    type: "kernel version",
    shownDefault: "the newest `vmlinuz-*-cloud-amd64` in /boot",
    allowed: "a version as in /lib/modules (letters, digits, . _ + -)",
    description: "the host kernel an image build puts in the guest",
    schema: (z) => z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._+-]*$/),
  }),
  append: optional({
    env: "FORKD_APPEND",
    group: "vm",
    type: "text",
    shownDefault: "forkd's (console, panic, TSC rate under TCG)",
    allowed: "a kernel command line",
    description: "the guest kernel command line, replacing forkd's",
    schema: text,
  }),
  busybox: required({
    env: "FORKD_BUSYBOX",
    group: "vm",
    type: "path",
    default: "/bin/busybox",
    allowed: "a path to a static busybox",
    description: "the busybox an image's initramfs is built with",
    schema: plainPath,
  }),
  vmmLaunch: optional({
    env: "FORKD_VMM_LAUNCH",
    group: "vm",
    type: "path",
    shownDefault: "`forkd-vmm-launch` beside core's dist",
    allowed: "a path",
    description: "the launcher that confines each VMM",
    schema: plainPath,
  }),
  capturePages: optional({
    env: "FORKD_CAPTURE_PAGES",
    group: "vm",
    type: "path",
    shownDefault: "`forkd-capture-pages` beside core's dist",
    allowed: "a path",
    description: "the helper that copies the pages a guest wrote (diff and live BRANCH)",
    schema: plainPath,
  }),
  confine: required({
    env: "FORKD_CONFINE",
    group: "vm",
    type: "on | off",
    default: "on" as "on" | "off",
    allowed: "on or off",
    description: "each VMM under its own uid, seccomp and a private mount view; off fails `forkd doctor`",
    schema: onOff,
  }),
  confineHide: required({
    env: "FORKD_CONFINE_HIDE",
    group: "vm",
    type: "paths, `:`-separated",
    default: [] as string[],
    shownDefault: "none (forkd's own dirs, /root, /home and /etc/shadow are always hidden)",
    allowed: "absolute paths separated by `:`",
    description: "more host paths no VMM may see (the daemon adds its token file, audit log and TLS key)",
    schema: absolutePathList,
    toEnv: (paths) => paths.join(":"),
  }),
  agentNativeCalls: required({
    env: "FORKD_AGENT_NATIVE_CALLS",
    group: "vm",
    type: "on | off",
    default: "on" as "on" | "off",
    allowed: "on or off",
    description:
      "a parked guest's small native gate answers exec and file read/write/stat itself; off sends every call to the guest's JavaScript runtime (`via: \"runtime\"`, for comparing the two)",
    schema: onOff,
  }),
  networkPolicy: required({
    env: "FORKD_NETWORK_POLICY",
    group: "vm",
    type: "on | off",
    default: "on" as "on" | "off",
    allowed: "on or off",
    description: "the sandboxes' egress policy (`forkd daemon --network-policy` wins); off fails `forkd doctor`",
    schema: onOff,
  }),
  maxOutputBytes: required({
    env: "FORKD_MAX_OUTPUT_BYTES",
    group: "limits",
    type: "bytes",
    default: 16 * 1024 * 1024,
    allowed: "a whole number above 0",
    description: "the output one exec call delivers at most",
    schema: positiveInteger,
  }),
  agentGraceMs: required({
    env: "FORKD_AGENT_GRACE_MS",
    group: "limits",
    type: "ms",
    default: 30_000,
    allowed: "a whole number above 0",
    description: "how long an agent may stay silent after a cancel before its sandbox is marked unhealthy",
    schema: positiveInteger,
  }),
  clockResyncMs: required({
    env: "FORKD_CLOCK_RESYNC_MS",
    group: "limits",
    type: "ms",
    default: 60_000,
    allowed: "a whole number above 0",
    description: "idle time after which the guest's clock is set again before the next call",
    schema: positiveInteger,
  }),
  diffConvergeMs: required({
    env: "FORKD_DIFF_CONVERGE_MS",
    group: "limits",
    type: "ms",
    default: 5000,
    allowed: "a number above 0",
    description: "how long diff BRANCH pre-copy chases dirty pages after its first pass before stopping the source",
    schema: positiveNumber,
  }),
  branchMaxMibps: optional({
    env: "FORKD_BRANCH_MAX_MIBPS",
    group: "limits",
    type: "MiB/s",
    shownDefault: "unlimited",
    allowed: "a number above 0",
    description: "what a BRANCH capture may write per second",
    schema: positiveNumber,
  }),
  admitMemoryHeadroomMib: optional({
    env: "FORKD_ADMIT_MEMORY_HEADROOM_MIB",
    group: "limits",
    type: "MiB",
    shownDefault: "5% of RAM, from 256 to 2048",
    allowed: "a number, 0 or more",
    description: "host memory the daemon's admission never hands out",
    schema: (z) => z.coerce.number().min(0),
  }),
  admitDirtyFraction: required({
    env: "FORKD_ADMIT_DIRTY_FRACTION",
    group: "limits",
    type: "fraction",
    default: 0.25,
    allowed: "a number from 0 to 1",
    description: "how much of its RAM a child without a memory limit is counted as writing (1: the worst case)",
    schema: (z) => z.coerce.number().min(0).max(1),
  }),
  hubUrl: optional({
    env: "FORKD_HUB_URL",
    group: "registry",
    type: "URL",
    shownDefault: "none",
    allowed: "the URL of a hub index (registry.json)",
    description: "where `forkd pull OWNER/NAME` looks names up (`--hub` wins)",
    schema: text,
  }),
  insecureRegistries: required({
    env: "FORKD_INSECURE_REGISTRIES",
    group: "registry",
    type: "hosts, `,`-separated",
    default: [] as string[],
    shownDefault: "none",
    allowed: "HOST[:PORT] names separated by `,`",
    description: "registries forkd may reach over plain http (with `--insecure-registry`)",
    schema: commaList,
    toEnv: (hosts) => hosts.join(","),
  }),
  registryUsername: optional({
    env: "FORKD_REGISTRY_USERNAME",
    group: "registry",
    type: "text",
    shownDefault: "none",
    allowed: "a user name",
    description: "registry user name (with FORKD_REGISTRY_PASSWORD; before docker's config.json)",
    schema: text,
  }),
  registryPassword: optional({
    env: "FORKD_REGISTRY_PASSWORD",
    group: "registry",
    type: "text",
    shownDefault: "none",
    allowed: "a password",
    description: "registry password, only ever sent in an Authorization header",
    schema: text,
    secret: true,
    keepsEmpty: true,
  }),
  dockerConfig: optional({
    env: "DOCKER_CONFIG",
    group: "registry",
    type: "path",
    shownDefault: "`~/.docker`",
    allowed: "a directory",
    description: "where docker's config.json (registry credentials in `auths`) is",
    schema: plainPath,
  }),
  registryTimeoutMs: required({
    env: "FORKD_REGISTRY_TIMEOUT_MS",
    group: "registry",
    type: "ms",
    default: 60_000,
    allowed: "a number above 0",
    description: "how long a registry request may go without an answer or a byte",
    schema: positiveNumber,
  }),
  registryChunkMib: required({
    env: "FORKD_REGISTRY_CHUNK_MIB",
    group: "registry",
    type: "MiB",
    default: 16,
    allowed: "a number above 0, at most 512",
    description: "upload chunk size of a push",
    schema: (z) => z.coerce.number().positive().max(512),
  }),
  cluster: optional({
    env: "FORKD_CLUSTER",
    group: "cluster",
    type: "etcd URL",
    shownDefault: "none (a single host)",
    allowed: "etcd://HOST:PORT[,HOST:PORT…]",
    description: "the etcd members a daemon joins its cluster through (`--cluster` wins); unset, the daemon serves alone",
    schema: (z) => z.string().regex(/^etcd:\/\/[^\s/,]+(,[^\s/,]+)*\/?$/),
  }),
  nodeName: optional({
    env: "FORKD_NODE_NAME",
    group: "cluster",
    type: "name",
    shownDefault: "the host name",
    allowed: "1-63 letters, digits, '-', '_' and '.', starting with a letter or digit",
    description: "this daemon's name in the cluster (`--node-name` wins); unique among live nodes",
    schema: (z) => z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/),
  }),
  advertiseUrl: optional({
    env: "FORKD_ADVERTISE_URL",
    group: "cluster",
    type: "URL",
    shownDefault: "the daemon's --listen address",
    allowed: "http://HOST:PORT or https://HOST:PORT",
    description: "where the other nodes reach this daemon's API (`--advertise-url` wins)",
    schema: (z) => z.string().regex(/^https?:\/\/[^\s/@?#]+\/?$/),
  }),
  clusterToken: optional({
    env: "FORKD_CLUSTER_TOKEN",
    group: "cluster",
    type: "text",
    shownDefault: "none (`--cluster-token-file`)",
    allowed: "a secret of at least 16 characters, the same on every node",
    description: "the secret nodes present to each other on forwarded calls (never logged); `--cluster-token-file` wins",
    schema: (z) => z.string().min(16),
    secret: true,
  }),
  clusterLeaseTtlS: required({
    env: "FORKD_CLUSTER_LEASE_TTL",
    group: "cluster",
    type: "s",
    default: 10,
    allowed: "a whole number of seconds from 2 to 300",
    description: "how long a node that stops answering etcd keeps its lease: after it, its sandboxes answer 503 `node_unreachable`",
    schema: (z) => z.coerce.number().int().min(2).max(300),
  }),
  clusterTimeoutMs: required({
    env: "FORKD_CLUSTER_TIMEOUT_MS",
    group: "cluster",
    type: "ms",
    default: 2000,
    allowed: "a number above 0",
    description: "how long one etcd call or one forwarded call's connection may take before the cluster counts as unreachable",
    schema: positiveNumber,
  }),
  registry: optional({
    env: "FORKD_CLUSTER_REGISTRY",
    group: "cluster",
    type: "URL",
    shownDefault: "none",
    allowed: "oci://HOST[:PORT]/REPOSITORY",
    description: "the OCI registry the nodes move snapshots through (`--registry` wins)",
    schema: (z) => z.string().regex(/^oci:\/\/[^\s/]+\/[^\s]+$/),
  }),
  url: optional({
    env: "FORKD_URL",
    group: "client",
    type: "URL",
    shownDefault: "the local socket when a daemon answers there, else forkd works on the state directly",
    allowed: "http://HOST:PORT, https://HOST:PORT or unix:/PATH",
    description: "the daemon the CLI (and the SDKs and MCP server) talk to (`--daemon-url` wins)",
    schema: (z) => z.string().regex(DAEMON_URL_RE),
  }),
  token: optional({
    env: "FORKD_TOKEN",
    group: "client",
    type: "text",
    shownDefault: "`$FORKD_HOME/token` for a daemon on this host",
    allowed: "the daemon's bearer token",
    description: "the bearer token sent to FORKD_URL (`--daemon-token` wins; the socket needs none)",
    schema: text,
    secret: true,
  }),
  socket: optional({
    env: "FORKD_SOCKET",
    group: "client",
    type: "path",
    shownDefault: "`$FORKD_RUN_DIR/forkd.sock`",
    allowed: "a path",
    description: "the unix socket the CLI looks for a daemon on when FORKD_URL is unset",
    schema: plainPath,
  }),
  httpTimeoutSecs: required({
    env: "FORKD_HTTP_TIMEOUT",
    group: "client",
    type: "s",
    default: 60,
    allowed: "a number above 0",
    description: "how long `forkd mcp` waits for a daemon call without a timeout of its own",
    schema: positiveNumber,
  }),
  fault: optional({
    env: "FORKD_FAULT",
    group: "development",
    type: "STEP[@N][:fail],…",
    shownDefault: "none",
    allowed: "fault steps (common/fault.ts) separated by `,`, each optionally @N and :fail",
    description: "tests only: SIGKILL this process when it reaches the step (the Nth time), or with :fail throw there",
    schema: (z) => z.string().regex(/^\s*[a-z][a-z.-]*(@[1-9][0-9]*)?(:fail)?\s*(,\s*[a-z][a-z.-]*(@[1-9][0-9]*)?(:fail)?\s*)*$/),
  }),
  benchDir: optional({
    env: "FORKD_BENCH_DIR",
    group: "development",
    type: "path",
    shownDefault: "none",
    allowed: "a directory",
    description: "where `forkd bench` keeps each result as NAME.json",
    schema: plainPath,
  }),
  dockerRegistry: required({
    env: "FORKD_DOCKER_REGISTRY",
    group: "development",
    type: "path",
    default: "/usr/bin/docker-registry",
    allowed: "a path",
    description: "the registry `forkd bench pack` runs locally",
    schema: plainPath,
  }),
  searchPath: required({
    env: "PATH",
    group: "development",
    type: "paths, `:`-separated",
    default: "/usr/bin:/bin",
    allowed: "directories separated by `:`",
    description: "where `forkd doctor` looks for the host programs forkd runs",
    schema: text,
  }),
} as const;

export type SettingName = keyof typeof SETTINGS;
export type Settings = { [K in SettingName]: (typeof SETTINGS)[K] extends SettingSpec<infer T> ? T : never };

type Cached = { raw: string | undefined; value: unknown };
const parsed = new Map<SettingName, Cached>();
let overrides: Partial<Settings> = {};

function readEnv(name: string): string | undefined {
  return process.env[name];
}

function parseSetting<K extends SettingName>(name: K, raw: string | undefined): Settings[K] {
  const spec = SETTINGS[name] as SettingSpec<Settings[K]>;
  if (raw === undefined || (raw === "" && !spec.keepsEmpty)) return spec.default;
  if ((spec.schema as unknown) === anyText) return raw as Settings[K];
  // A path (FORKD_HOME, FORKD_RUN_DIR: set by most scripted uses) is made absolute without loading zod.
  if ((spec.schema as unknown) === resolvedPath) return path.resolve(raw) as Settings[K];
  const result = spec.schema(loadZod()).safeParse(raw);
  if (result.success) return result.data;
  const shown = spec.secret ? "(hidden)" : `'${raw.length > 200 ? `${raw.slice(0, 200)}…` : raw}'`;
  throw new ForkdError("invalid_setting", `${spec.env}=${shown} is not allowed: ${spec.allowed}`, {
    variable: spec.env,
    ...(spec.secret ? {} : { value: raw }),
    allowed: spec.allowed,
  });
}

/** One setting: an override the daemon or CLI configured, else its variable, checked. */
export function setting<K extends SettingName>(name: K): Settings[K] {
  if (Object.hasOwn(overrides, name)) return overrides[name] as Settings[K];
  const raw = readEnv(SETTINGS[name].env);
  const hit = parsed.get(name);
  if (hit && hit.raw === raw) return hit.value as Settings[K];
  const value = parseSetting(name, raw);
  parsed.set(name, { raw, value });
  return value;
}

/** Every setting, each checked: what a process calls at start-up, so a bad value stops it before it does anything. */
export function settings(): Settings {
  return Object.fromEntries(Object.keys(SETTINGS).map((name) => [name, setting(name as SettingName)])) as Settings;
}

/**
 * Decide settings in code rather than in the environment (a flag of the daemon or
 * the CLI, a benchmark's scratch store): they win over the variables until the
 * returned function restores what was configured before.
 */
export function configureSettings(values: Partial<Settings>): () => void {
  const before = overrides;
  overrides = { ...overrides, ...values };
  return () => {
    overrides = before;
  };
}

/** Run `fn` with `values` configured, and restore what was configured before when it settles. */
export async function withSettings<T>(values: Partial<Settings>, fn: () => Promise<T>): Promise<T> {
  const restore = configureSettings(values);
  try {
    return await fn();
  } finally {
    restore();
  }
}

function envValue<K extends SettingName>(name: K, value: Settings[K]): string | undefined {
  if (value === undefined) return undefined;
  const spec = SETTINGS[name] as SettingSpec<Settings[K]>;
  return spec.toEnv ? spec.toEnv(value as NonNullable<Settings[K]>) : String(value);
}

/**
 * The environment for a child process forkd starts (a daemon for a benchmark, a
 * registry): this process's, with what was configured in code and `values` written
 * into their variables, so the child decides as this process would.
 */
export function settingsEnv(values: Partial<Settings> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const [name, value] of Object.entries({ ...overrides, ...values })) {
    const variable = SETTINGS[name as SettingName].env;
    const text = envValue(name as SettingName, value as Settings[SettingName]);
    if (text === undefined) delete env[variable];
    else env[variable] = text;
  }
  return env;
}

/** The socket a daemon listens on unless told otherwise: $FORKD_RUN_DIR/forkd.sock. */
export function defaultSocketPath(): string {
  return path.join(setting("runDir"), "forkd.sock");
}

/** The socket a client looks for a local daemon on: FORKD_SOCKET, else the daemon's default. */
export function clientSocketPath(): string {
  return setting("socket") ?? defaultSocketPath();
}

const GROUP_TITLES: Record<SettingGroup, string> = {
  state: "Where state lives",
  vm: "VMs",
  limits: "Limits",
  registry: "Registries and hubs",
  cluster: "Cluster (`forkd daemon --cluster`)",
  client: "Clients (CLI, SDKs, MCP server)",
  development: "Development and benchmarks",
};

function cell(text: string): string {
  return text.replaceAll("|", "\\|").replaceAll("\n", " ");
}

function shownDefault(spec: SettingSpec<unknown>): string {
  if (spec.shownDefault) return spec.shownDefault;
  const value = spec.default;
  if (value === undefined) return "unset";
  if (Array.isArray(value)) return value.length ? `\`${value.join(",")}\`` : "none";
  return `\`${String(value)}\``;
}

/** The README's configuration tables, one per group, in the table's order (`npm run docs:settings` writes them). */
export function settingsMarkdown(): string {
  const lines: string[] = [];
  for (const group of Object.keys(GROUP_TITLES) as SettingGroup[]) {
    const specs = Object.values(SETTINGS as Record<string, SettingSpec<unknown>>).filter((s) => s.group === group);
    if (!specs.length) continue;
    if (lines.length) lines.push("");
    lines.push(
      `**${GROUP_TITLES[group]}**`,
      "",
      "| Variable | Type | Default | Allowed | What it sets |",
      "| --- | --- | --- | --- | --- |",
    );
    for (const spec of specs) {
      lines.push(
        `| \`${spec.env}\` | ${cell(spec.type)} | ${cell(shownDefault(spec))} | ${cell(spec.allowed)} | ${cell(spec.description)} |`,
      );
    }
  }
  return lines.join("\n");
}
