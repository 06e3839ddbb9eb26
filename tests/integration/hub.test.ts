// Snapshots that travel, against real servers on loopback: Debian's docker-registry
// (CNCF distribution, htpasswd auth, filesystem storage in a temp dir) and a plain
// Node HTTP server for a hub index and pack URLs. A warm snapshot and two BRANCH
// layers are pushed from one FORKD_HOME and pulled into fresh ones, where children
// see the parent's warm state; shared bases cross the wire once; tampered,
// truncated, escaping, mismatched and symlinked content is refused with nothing
// registered; a pull killed with SIGKILL resumes its download and completes.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createHash, createPrivateKey, randomBytes, sign, X509Certificate } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import { Controller } from "@forkd/sdk";
import tar from "tar-stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { compress } from "zstd-napi";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { CLI, isolateForkd } from "../helpers/env.js";

const USER = "forkd";
const PASSWORD = "forkd-test-secret";
/** bcrypt of PASSWORD (cost 4: the registry checks it on every request). */
const HTPASSWD = `${USER}:$2b$04$EXQ2Scc2CgD56amWJjon0.xF8S0Mh3D30lhupTf2OvTeYLCtQU.jW\n`;

type Home = { home: string; runDir: string; shm: string; env: NodeJS.ProcessEnv };

const execFileP = promisify(execFile);
const homeA = isolateForkd();
const shmRoots: string[] = [];
const creds = { FORKD_REGISTRY_USERNAME: USER, FORKD_REGISTRY_PASSWORD: PASSWORD };

function shmFor(name: string): string {
  const dir = path.join("/dev/shm", `forkd-test-hub-${process.pid}-${name}`);
  shmRoots.push(dir);
  return dir;
}

process.env.FORKD_SHM_DIR = shmFor("a");
Object.assign(process.env, creds);
const A: Home = { home: homeA.home, runDir: homeA.runDir, shm: process.env.FORKD_SHM_DIR, env: { ...process.env } };

/** A fresh FORKD_HOME laid out as isolateForkd's (so the global teardown finds its egress namespace); images linked in or not. */
function freshHome(name: string, linkImages: boolean): Home {
  const root = fs.mkdtempSync(path.join(process.env.FORKD_TEST_ROOT ?? "/tmp", "forkd-test-"));
  const home = path.join(root, "home");
  const runDir = path.join(root, "run");
  fs.mkdirSync(home, { mode: 0o700 });
  fs.mkdirSync(runDir, { mode: 0o700 });
  if (linkImages) fs.symlinkSync(fs.readlinkSync(path.join(A.home, "images")), path.join(home, "images"));
  const shm = shmFor(name);
  return { home, runDir, shm, env: { ...process.env, FORKD_HOME: home, FORKD_RUN_DIR: runDir, FORKD_SHM_DIR: shm } };
}

type Run = { code: number | null; stdout: string; stderr: string };

/** The CLI as its own process (never spawnSync: the servers this test runs answer from this event loop). */
function forkd(args: string[], env: NodeJS.ProcessEnv, onSpawn?: (child: ChildProcess) => void): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    onSpawn?.(child);
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

async function forkdJson<T>(args: string[], env: NodeJS.ProcessEnv): Promise<T> {
  const res = await forkd([...args, "--json"], env);
  if (res.code !== 0) throw new Error(`forkd ${args.join(" ")} exited ${res.code}: ${res.stderr}`);
  return JSON.parse(res.stdout) as T;
}

async function sh(id: string, cmd: string, env: NodeJS.ProcessEnv): Promise<string> {
  const res = await forkd(["exec", id, "--shell", "--", cmd], env);
  if (res.code !== 0) throw new Error(`exec ${cmd} exited ${res.code}: ${res.stderr}`);
  return res.stdout;
}

async function forkOne(tag: string, env: NodeJS.ProcessEnv): Promise<string> {
  const rows = await forkdJson<{ id: string; ok: boolean }[]>(["fork", "--tag", tag], env);
  expect(rows[0]?.ok).toBe(true);
  return rows[0]!.id;
}

/** Snapshots registered in a home (dot-dirs are temp dirs, never snapshots). */
function registered(h: Home): string[] {
  const dir = path.join(h.home, "snapshots");
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((n) => !n.startsWith(".") && fs.existsSync(path.join(dir, n, "manifest.json")))
    .sort();
}

function tempDirs(h: Home): string[] {
  const dir = path.join(h.home, "snapshots");
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => n.startsWith(".")) : [];
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

// --- the registry -----------------------------------------------------------

const registries: ChildProcess[] = [];
let registryPort = 0;
let registryData = "";
const REPO = "forkd/app";

/** A docker-registry of our own on a free loopback port, storage in a temp dir, with the given `auth:` section. */
async function startRegistry(auth: (dir: string) => string[]): Promise<{ port: number; data: string }> {
  const dir = fs.mkdtempSync(path.join(process.env.FORKD_TEST_ROOT ?? "/tmp", "registry-"));
  const data = path.join(dir, "data");
  const port = await freePort();
  const config = [
    "version: 0.1",
    "log:",
    "  level: warn",
    "  accesslog:",
    "    disabled: true",
    "storage:",
    "  filesystem:",
    `    rootdirectory: ${data}`,
    "http:",
    `  addr: 127.0.0.1:${port}`,
    `  secret: ${randomBytes(16).toString("hex")}`,
    "auth:",
    ...auth(dir),
    "",
  ].join("\n");
  fs.writeFileSync(path.join(dir, "config.yml"), config);
  const child = spawn("/usr/bin/docker-registry", ["serve", path.join(dir, "config.yml")], { stdio: ["ignore", "ignore", "pipe"] });
  registries.push(child);
  let log = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (log = (log + d).slice(-20_000)));
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    const status = await fetch(`http://127.0.0.1:${port}/v2/`).then(
      (r) => r.status,
      () => 0,
    );
    if (status === 401) return { port, data };
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`docker-registry did not start: ${log}`);
}

async function startHtpasswdRegistry(): Promise<void> {
  const started = await startRegistry((dir) => {
    fs.writeFileSync(path.join(dir, "htpasswd"), HTPASSWD);
    return ["  htpasswd:", "    realm: forkd-test", `    path: ${path.join(dir, "htpasswd")}`];
  });
  registryPort = started.port;
  registryData = started.data;
}

const authHeader = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString("base64")}`;

type OciManifest = {
  config: { digest: string; size: number };
  layers: { digest: string; size: number; annotations: Record<string, string> }[];
};

async function registryManifest(tag: string): Promise<{ manifest: OciManifest; bytes: number }> {
  const res = await fetch(`http://127.0.0.1:${registryPort}/v2/${REPO}/manifests/${tag}`, {
    headers: { authorization: authHeader, accept: "application/vnd.oci.image.manifest.v1+json" },
  });
  expect(res.status).toBe(200);
  const text = await res.text();
  return { manifest: JSON.parse(text) as OciManifest, bytes: Buffer.byteLength(text) };
}

function blobData(digest: string): string {
  const hex = digest.slice("sha256:".length);
  return path.join(registryData, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
}

/** A TCP proxy to the registry that slows its answers to `bytesPerSecond`: a pull through it can be killed midway. */
function slowProxy(bytesPerSecond: number): Promise<{ port: number; close: () => void }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(registryPort, "127.0.0.1");
    sockets.add(client).add(upstream);
    client.pipe(upstream);
    upstream.on("data", (chunk: Buffer) => {
      client.write(chunk);
      upstream.pause();
      setTimeout(() => upstream.resume(), (chunk.length / bytesPerSecond) * 1000);
    });
    upstream.on("end", () => client.end());
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: (server.address() as net.AddressInfo).port,
        close: () => {
          for (const s of sockets) s.destroy();
          server.close();
        },
      }),
    );
  });
}

// --- the hub: a plain HTTP server with Range support ---------------------------

const hubFiles = new Map<string, Buffer>();
let hub: http.Server;
let hubUrl = "";

function startHub(): Promise<void> {
  hub = http.createServer((req, res) => {
    const body = hubFiles.get((req.url ?? "").split("?")[0]!);
    if (!body) {
      res.writeHead(404).end();
      return;
    }
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (range && Number(range[1]) < body.length) {
      const from = Number(range[1]);
      res.writeHead(206, { "content-length": body.length - from, "content-range": `bytes ${from}-${body.length - 1}/${body.length}` });
      res.end(body.subarray(from));
      return;
    }
    res.writeHead(200, { "content-length": body.length }).end(body);
  });
  return new Promise((resolve) =>
    hub.listen(0, "127.0.0.1", () => {
      hubUrl = `http://127.0.0.1:${(hub.address() as net.AddressInfo).port}`;
      resolve();
    }),
  );
}

// --- a token service, as Docker Hub's, GHCR's and Harbor's: Basic credentials in, a signed JWT out ---

const ISSUER = "forkd-test-issuer";
const SERVICE = "forkd-test-registry";
let tokenServer: http.Server | undefined;
const tokenRequests: { scopes: string[]; user: string | null }[] = [];

/** A registry that trusts tokens signed by a key of our own, and the service that signs them. */
async function startTokenRegistry(): Promise<{ port: number }> {
  const dir = fs.mkdtempSync(path.join(process.env.FORKD_TEST_ROOT ?? "/tmp", "token-"));
  const keyFile = path.join(dir, "key.pem");
  const certFile = path.join(dir, "cert.pem");
  await execFileP("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    keyFile,
    "-out",
    certFile,
    "-days",
    "1",
    "-subj",
    "/CN=forkd-test-token",
  ]);
  const key = createPrivateKey(fs.readFileSync(keyFile));
  const der = new X509Certificate(fs.readFileSync(certFile)).raw.toString("base64");
  const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
  tokenServer = http.createServer((req, res) => {
    const scopes = new URL(req.url ?? "/", "http://token").searchParams.getAll("scope");
    let user: string | null = null;
    const basic = /^Basic (.+)$/.exec(req.headers.authorization ?? "");
    if (basic) {
      const [u, p] = Buffer.from(basic[1]!, "base64").toString().split(":");
      if (u !== USER || p !== PASSWORD) {
        tokenRequests.push({ scopes, user: `refused:${u}` });
        res.writeHead(401, { "content-type": "application/json" }).end('{"details":"incorrect username or password"}');
        return;
      }
      user = u;
    }
    tokenRequests.push({ scopes, user });
    // Anonymous callers get a token that grants nothing, as a private repository's service answers.
    const access = user
      ? scopes.map((scope) => {
          const [type, name, actions] = scope.split(":");
          return { type, name, actions: (actions ?? "").split(",") };
        })
      : [];
    const now = Math.floor(Date.now() / 1000);
    const header = b64({ typ: "JWT", alg: "RS256", x5c: [der] });
    const claims = b64({
      iss: ISSUER,
      sub: user ?? "",
      aud: SERVICE,
      exp: now + 300,
      nbf: now - 10,
      iat: now,
      jti: randomBytes(8).toString("hex"),
      access,
    });
    const signature = sign("sha256", Buffer.from(`${header}.${claims}`), key).toString("base64url");
    res
      .writeHead(200, { "content-type": "application/json" })
      .end(JSON.stringify({ token: `${header}.${claims}.${signature}`, expires_in: 300 }));
  });
  const tokenPort = await new Promise<number>((resolve) =>
    tokenServer!.listen(0, "127.0.0.1", () => resolve((tokenServer!.address() as net.AddressInfo).port)),
  );
  return startRegistry(() => [
    "  token:",
    `    realm: http://127.0.0.1:${tokenPort}/token`,
    `    service: ${SERVICE}`,
    `    issuer: ${ISSUER}`,
    `    rootcertbundle: ${certFile}`,
  ]);
}

// --- crafted packs --------------------------------------------------------------

const sha256 = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");

type Entry = { name: string; data?: Buffer; type?: "file" | "symlink"; linkname?: string };

/**
 * A small pack that forkd accepts (a made-up image build and one snapshot, every
 * digest right), or one spoiled by `spoil`: members rewritten, added or replaced
 * after the index was written.
 */
async function craftPack(tag: string, spoil: (entries: Entry[]) => Entry[] = (e) => e): Promise<{ pack: Buffer; imageDigest: string }> {
  const imageDigest = randomBytes(32).toString("hex");
  const memory = Buffer.concat([Buffer.from(`memory of ${tag}\n`), Buffer.alloc(8192, 7)]);
  const img = `images/craftimg/${imageDigest}`;
  const manifest = {
    schema: 1,
    tag,
    createdAt: new Date().toISOString(),
    image: { name: "craftimg", digest: imageDigest, kernel: "vmlinuz", initrd: "initrd.cpio", rootfs: "rootfs.ext4" },
    kernelVersion: "0",
    accel: "kvm",
    vcpus: 1,
    memoryMib: 128,
    network: false,
    warm: { commands: [], evals: [] },
    sizes: { memoryBytes: memory.length, memoryAllocatedBytes: memory.length, vmstateBytes: 16 },
    memorySha256: sha256(memory),
    parent: null,
    branchedFrom: null,
    timings: { bootMs: 0, warmMs: 0, saveMs: 0, totalMs: 0 },
  };
  const members: Entry[] = [
    { name: `${img}/image.json`, data: Buffer.from(JSON.stringify({ name: "craftimg", digest: imageDigest })) },
    { name: `${img}/vmlinuz`, data: Buffer.from("not a kernel") },
    { name: `${img}/initrd.cpio`, data: Buffer.from("not an initrd") },
    { name: `${img}/rootfs.ext4`, data: Buffer.from("not a root image") },
    { name: `snapshots/${tag}/manifest.json`, data: Buffer.from(JSON.stringify(manifest)) },
    { name: `snapshots/${tag}/vmstate.bin`, data: Buffer.from("device state 16B") },
    { name: `snapshots/${tag}/memory.bin`, data: memory },
  ];
  const index = {
    format: "forkd-pack",
    version: 1,
    created_at: new Date().toISOString(),
    head: tag,
    snapshots: [tag],
    images: [{ name: "craftimg", digest: imageDigest }],
    files: members.map((m) => ({
      path: m.name,
      size: m.data!.length,
      sha256: sha256(m.data!),
      encoding: "raw",
      encoded_bytes: m.data!.length,
    })),
  };
  const entries = spoil([{ name: "forkd-pack.json", data: Buffer.from(JSON.stringify(index)) }, ...members]);
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const ended = new Promise((resolve, reject) => pack.on("end", resolve).on("error", reject));
  pack.on("data", (c: Buffer) => chunks.push(c));
  for (const e of entries) {
    if (e.type === "symlink") pack.entry({ name: e.name, type: "symlink", linkname: e.linkname });
    else pack.entry({ name: e.name, size: e.data!.length, mode: 0o644 }, e.data!);
  }
  pack.finalize();
  await ended;
  const archive = Buffer.concat(chunks);
  expect(archive.length).toBeGreaterThan(10 * 512);
  return { pack: compress(archive), imageDigest };
}

// --- the suite --------------------------------------------------------------------

const BASE = "hub-base";
const L1 = "hub-l1";
const L2 = "hub-l2";
const ref = (tag: string, port = registryPort) => `127.0.0.1:${port}/${REPO}:${tag}`;
let B: Home;
let daemon: DaemonHandle | undefined;
const children: { id: string; env: NodeJS.ProcessEnv }[] = [];

type PushJson = { blobs: number; blobs_uploaded: number; blobs_present: number; uploaded_bytes: number; members_uploaded: string[] };
type PullJson = {
  tag: string;
  registered: string[];
  reused: string[];
  images_added: string[];
  downloaded_bytes: number;
  transfer_bytes: number;
  members_downloaded?: string[];
  members_local?: string[];
};

beforeAll(async () => {
  await Promise.all([startHtpasswdRegistry(), startHub()]);
  // One warm parent and two BRANCH layers on it, each carrying a file written before its BRANCH.
  await forkd(["snapshot", "--tag", BASE, "--memory-mib", "128", "--warm", "echo warm-state > /root/warm.txt"], A.env).then((r) =>
    expect(r.code, r.stderr).toBe(0),
  );
  const source = await forkOne(BASE, A.env);
  children.push({ id: source, env: A.env });
  await sh(source, "echo branch-one > /root/branch1.txt", A.env);
  await forkdJson(["branch", source, "--tag", L1, "--mode", "diff"], A.env);
  await sh(source, "echo branch-two > /root/branch2.txt", A.env);
  await forkdJson(["branch", source, "--tag", L2, "--mode", "diff"], A.env);
  B = freshHome("b", false);
});

afterAll(async () => {
  for (const c of children) await forkd(["kill", c.id], c.env).catch(() => {});
  if (daemon) await stopDaemon(daemon, "SIGKILL");
  for (const r of registries) r.kill("SIGKILL");
  tokenServer?.close();
  hub?.close();
  for (const dir of shmRoots) fs.rmSync(dir, { recursive: true, force: true });
});

describe("registry push and pull", () => {
  it("pushes a chain from one home and pulls it into a fresh one, whose child sees the warm and branched state", async () => {
    const pushed = await forkdJson<PushJson>(["push", L1, ref(L1)], A.env);
    // A fresh registry: every blob (image build, base, layer, index) goes up once.
    expect(pushed.blobs_uploaded).toBe(pushed.blobs);
    expect(pushed.members_uploaded).toEqual(expect.arrayContaining([`snapshots/${BASE}/memory.bin`, `snapshots/${L1}/layer.bin`]));
    expect(pushed.members_uploaded.some((m) => m.endsWith("/rootfs.ext4"))).toBe(true);

    // B has nothing, not even the image build; its credentials come from docker's config.json.
    const dockerConfig = path.join(B.home, "..", "docker");
    fs.mkdirSync(dockerConfig);
    fs.writeFileSync(
      path.join(dockerConfig, "config.json"),
      JSON.stringify({ auths: { [`127.0.0.1:${registryPort}`]: { auth: Buffer.from(`${USER}:${PASSWORD}`).toString("base64") } } }),
    );
    const env: Record<string, string | undefined> = { ...B.env, DOCKER_CONFIG: dockerConfig };
    delete env.FORKD_REGISTRY_USERNAME;
    delete env.FORKD_REGISTRY_PASSWORD;
    const pulled = await forkdJson<PullJson>(["pull", ref(L1)], env);
    expect(pulled).toMatchObject({ tag: L1, registered: [BASE, L1], reused: [] });
    expect(pulled.images_added).toHaveLength(1);
    expect(pulled.downloaded_bytes).toBeGreaterThanOrEqual(pulled.transfer_bytes);
    expect(registered(B)).toEqual([BASE, L1]);
    expect(fs.readdirSync(path.join(B.home, "hub", "blobs"))).toEqual([]);

    const child = await forkOne(L1, B.env);
    children.push({ id: child, env: B.env });
    expect(await sh(child, "cat /root/warm.txt /root/branch1.txt; test -e /root/branch2.txt && echo LEAK || echo clean", B.env)).toBe(
      "warm-state\nbranch-one\nclean\n",
    );
  });

  it("pushes a second layer on the same base through the REST API: only the new layer's blobs go up", async () => {
    daemon = await startDaemonProcess(A.runDir);
    const api = new Controller({ url: daemon.url, token: daemon.token });
    const job = await api.pushSnapshot(L2, { ref: ref(L2) });
    expect(job.kind).toBe("push");
    const done = await api.waitForJob(job.id);
    const result = done.result as unknown as PushJson;
    expect(result.members_uploaded.sort()).toEqual(
      [`snapshots/${L2}/layer.bin`, `snapshots/${L2}/manifest.json`, `snapshots/${L2}/pagemap.bin`, `snapshots/${L2}/vmstate.bin`].sort(),
    );
    // The layer's four files and the index; the image build and the base were there.
    expect(result.blobs_uploaded).toBe(5);
    expect(result.blobs_present).toBe(result.blobs - 5);
    expect(done.progress.done_bytes).toBe(done.progress.total_bytes);

    // Pulling what this home already has fetches the manifests and registers nothing.
    const again = await api.waitForJob((await api.pullSnapshot({ ref: ref(L1) })).id);
    expect(again.result).toMatchObject({ registered: [], reused: [BASE, L1] });
    expect((again.result as unknown as PullJson).members_downloaded).toEqual([
      `snapshots/${BASE}/manifest.json`,
      `snapshots/${L1}/manifest.json`,
    ]);
    // Arguments are checked before a job starts: a bad one is a 400 naming what is wrong.
    const post = (route: string, body: unknown) =>
      fetch(`${daemon!.url}${route}`, {
        method: "POST",
        headers: { authorization: `Bearer ${daemon!.token}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      }).then(async (r) => ({ status: r.status, text: await r.text() }));
    const digestPush = await post(`/v1/snapshots/${L2}/push`, { ref: `127.0.0.1:${registryPort}/${REPO}@sha256:${"0".repeat(64)}` });
    expect(digestPush.status).toBe(400);
    expect(digestPush.text).toMatch(/push needs a tag/);
    expect((await post("/v1/snapshots/no-such-tag/push", { ref: ref("x") })).status).toBe(404);
    const form = await post("/v1/snapshots/pull", { ref: "not/a/form" });
    expect(form.status).toBe(400);
    expect(form.text).toMatch(/OWNER\/NAME/);
    expect((await post("/v1/snapshots/pull", { ref: ref(L1), hub: "http://127.0.0.1:1/registry.json" })).text).toMatch(
      /--hub is for OWNER\/NAME/,
    );
    expect((await post("/v1/snapshots/pull", { ref: ref(L1), tag: "../x" })).status).toBe(400);
    await stopDaemon(daemon);
    daemon = undefined;
  });

  it("pulls a layer whose base is already here by downloading only that layer", async () => {
    const pulled = await forkdJson<PullJson>(["pull", ref(L2)], B.env);
    expect(pulled).toMatchObject({ tag: L2, registered: [L2], reused: [BASE] });
    const ownFiles = ["manifest.json", "vmstate.bin", "layer.bin", "pagemap.bin"].map((f) => `snapshots/${L2}/${f}`);
    expect(pulled.members_downloaded).toEqual([`snapshots/${BASE}/manifest.json`, ...ownFiles]);
    const { manifest, bytes } = await registryManifest(L2);
    const size = (title: string) => manifest.layers.find((l) => l.annotations["org.opencontainers.image.title"] === title)!.size;
    const expected = bytes + manifest.config.size + size(`snapshots/${BASE}/manifest.json`) + ownFiles.reduce((s, f) => s + size(f), 0);
    expect(pulled.downloaded_bytes).toBe(expected);
    expect(pulled.downloaded_bytes).toBeLessThan(pulled.transfer_bytes / 20);
    const child = await forkOne(L2, B.env);
    children.push({ id: child, env: B.env });
    expect(await sh(child, "cat /root/warm.txt /root/branch1.txt /root/branch2.txt", B.env)).toBe("warm-state\nbranch-one\nbranch-two\n");
  });

  it("names what was tried: refused or missing credentials, a missing tag, a registry that is not there", async () => {
    const C = freshHome("cred", true);
    const wrong = await forkd(["pull", ref(L1)], { ...C.env, FORKD_REGISTRY_PASSWORD: "not-the-password" });
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/refused the credentials of user 'forkd' \(credentials from FORKD_REGISTRY_USERNAME/);
    expect(wrong.stderr).toContain("[registry_denied]");
    expect(wrong.stderr).not.toContain("not-the-password");
    const none: Record<string, string | undefined> = { ...C.env, DOCKER_CONFIG: path.join(C.home, "nowhere") };
    delete none.FORKD_REGISTRY_USERNAME;
    delete none.FORKD_REGISTRY_PASSWORD;
    const anonymous = await forkd(["pull", ref(L1)], none);
    expect(anonymous.stderr).toMatch(/asks for credentials to read the manifest of .*answered 401.*FORKD_REGISTRY_USERNAME/);
    const missing = await forkd(["pull", ref("no-such-tag")], C.env);
    expect(missing.stderr).toMatch(
      /no tag 127\.0\.0\.1:\d+\/forkd\/app:no-such-tag: GET http:\/\/127\.0\.0\.1:\d+\/v2\/forkd\/app\/manifests\/no-such-tag answered 404/,
    );
    const closed = await freePort();
    const down = await forkd(["push", L1, ref(L1, closed)], A.env);
    expect(down.stderr).toMatch(new RegExp(`cannot reach http://127\\.0\\.0\\.1:${closed}/v2/.*connection refused`));
    const form = await forkd(["pull", "not/a/form"], C.env);
    expect(form.code).toBe(2);
    expect(form.stderr).toMatch(/HOST\[:PORT\]\/REPO.*OWNER\/NAME.*https:\/\//);
    expect(registered(C)).toEqual([]);
  });

  it("refuses a blob the registry serves tampered, leaving nothing registered and no temp dir", async () => {
    const { manifest } = await registryManifest(L2);
    const layer = manifest.layers.find((l) => l.annotations["org.opencontainers.image.title"] === `snapshots/${L2}/layer.bin`)!;
    const file = blobData(layer.digest);
    const original = fs.readFileSync(file);
    const tampered = Buffer.from(original);
    tampered[Math.floor(tampered.length / 2)]! ^= 0xff;
    fs.writeFileSync(file, tampered);
    try {
      const C = freshHome("tamper", true);
      const res = await forkd(["pull", ref(L2)], C.env);
      expect(res.code).toBe(1);
      expect(res.stderr).toMatch(
        new RegExp(`blob ${layer.digest} \\(snapshots/${L2}/layer.bin\\).*does not match its sha256.*\\[integrity_failed\\]`),
      );
      expect(registered(C)).toEqual([]);
      expect(tempDirs(C)).toEqual([]);
      expect(fs.readdirSync(path.join(C.home, "hub", "blobs")).filter((n) => n.includes(layer.digest.slice(7)))).toEqual([]);
    } finally {
      fs.writeFileSync(file, original);
    }
  });

  it("a pull killed with SIGKILL midway registers nothing, and the next pull resumes the download and completes", async () => {
    const E = freshHome("kill", true);
    const proxy = await slowProxy(6 * 2 ** 20);
    const blobs = path.join(E.home, "hub", "blobs");
    let partialAtKill = 0;
    try {
      const killed = await forkd(["pull", ref(L1, proxy.port)], E.env, (child) => {
        const timer = setInterval(() => {
          const partial = fs.existsSync(blobs) ? fs.readdirSync(blobs).find((n) => n.endsWith(".partial")) : undefined;
          const size = partial ? fs.statSync(path.join(blobs, partial)).size : 0;
          if (size > 4 * 2 ** 20) {
            clearInterval(timer);
            child.kill("SIGKILL");
          }
        }, 20);
        child.on("close", () => clearInterval(timer));
      });
      expect(killed.code).toBeNull();
    } finally {
      proxy.close();
    }
    expect(registered(E)).toEqual([]);
    const partials = fs.readdirSync(blobs).filter((n) => n.endsWith(".partial"));
    expect(partials).toHaveLength(1);
    partialAtKill = fs.statSync(path.join(blobs, partials[0]!)).size;
    expect(partialAtKill).toBeGreaterThan(4 * 2 ** 20);

    const pulled = await forkdJson<PullJson>(["pull", ref(L1)], E.env);
    expect(pulled).toMatchObject({ tag: L1, registered: [BASE, L1] });
    const { manifest, bytes } = await registryManifest(L1);
    const size = (title: string) => manifest.layers.find((l) => l.annotations["org.opencontainers.image.title"] === title)!.size;
    const whole = bytes + manifest.config.size + pulled.members_downloaded!.reduce((s, f) => s + size(f), 0);
    expect(pulled.downloaded_bytes).toBeLessThanOrEqual(whole - partialAtKill);
    expect(registered(E)).toEqual([BASE, L1]);
    expect(fs.readdirSync(blobs)).toEqual([]);
  });
});

describe("a registry with Bearer tokens (as Docker Hub, GHCR and Harbor)", () => {
  it("pushes and pulls with a token from the challenge's realm for the repository's scope, and names a refusal", async () => {
    const { port } = await startTokenRegistry();
    const tref = `127.0.0.1:${port}/${REPO}:bearer`;
    const pushed = await forkdJson<PushJson>(["push", L1, tref], A.env);
    expect(pushed.blobs_uploaded).toBe(pushed.blobs);
    expect(tokenRequests.filter((r) => r.user === USER).map((r) => r.scopes)).toContainEqual([`repository:${REPO}:pull,push`]);
    const pulled = await forkdJson<PullJson>(["pull", tref], B.env);
    expect(pulled).toMatchObject({ tag: L1, registered: [], reused: [BASE, L1] });
    expect(tokenRequests.filter((r) => r.user === USER).map((r) => r.scopes)).toContainEqual([`repository:${REPO}:pull`]);
    const wrong = await forkd(["pull", tref], { ...B.env, FORKD_REGISTRY_PASSWORD: "not-the-password" });
    expect(wrong.stderr).toMatch(/refused the credentials of user 'forkd' .*GET http:\/\/127\.0\.0\.1:\d+\/token answered 401/);
    expect(wrong.stderr).not.toContain("not-the-password");
    const anonymous = { ...B.env };
    delete anonymous.FORKD_REGISTRY_USERNAME;
    delete anonymous.FORKD_REGISTRY_PASSWORD;
    anonymous.DOCKER_CONFIG = path.join(B.home, "nowhere");
    const denied = await forkd(["pull", tref], anonymous);
    expect(denied.stderr).toMatch(/asks for credentials to read the manifest of .*\[registry_denied\]/);
    expect(tokenRequests.some((r) => r.user === null)).toBe(true);
  });
});

describe("hub index and pack URLs", () => {
  let D: Home;
  const imageDirs = () => fs.readdirSync(path.join(D.home, "images", "craftimg")).filter((n) => /^[0-9a-f]{64}$/.test(n));

  beforeAll(() => {
    D = freshHome("packs", false);
  });

  async function refused(name: string, pack: Buffer, expectError: RegExp, sha?: string): Promise<void> {
    const before = registered(D);
    const images = fs.existsSync(path.join(D.home, "images", "craftimg")) ? imageDirs() : [];
    hubFiles.set(`/packs/${name}.forkd.tar.zst`, pack);
    hubFiles.set(
      "/registry.json",
      Buffer.from(JSON.stringify({ snapshots: { [`acme/${name}`]: { url: `packs/${name}.forkd.tar.zst`, sha256: sha ?? sha256(pack) } } })),
    );
    const res = await forkd(["pull", `acme/${name}`, "--hub", `${hubUrl}/registry.json`], D.env);
    expect(res.code, res.stdout).not.toBe(0);
    expect(res.stderr).toMatch(expectError);
    expect(registered(D)).toEqual(before);
    expect(tempDirs(D)).toEqual([]);
    if (images.length) expect(imageDirs()).toEqual(images);
  }

  it("pulls OWNER/NAME through a hub index, and a pack by URL", async () => {
    const { pack, imageDigest } = await craftPack("craft-ok");
    hubFiles.set("/packs/ok.forkd.tar.zst", pack);
    hubFiles.set(
      "/registry.json",
      Buffer.from(
        JSON.stringify({ snapshots: { "acme/ok": { url: "packs/ok.forkd.tar.zst", sha256: sha256(pack), description: "crafted" } } }),
      ),
    );
    const viaHub = await forkdJson<PullJson>(["pull", "acme/ok", "--hub", `${hubUrl}/registry.json`], D.env);
    expect(viaHub).toMatchObject({ tag: "craft-ok", registered: ["craft-ok"], images_added: [`craftimg@${imageDigest.slice(0, 12)}`] });
    expect(viaHub.downloaded_bytes).toBe(pack.length);
    const viaUrl = await forkdJson<PullJson>(["pull", `${hubUrl}/packs/ok.forkd.tar.zst`, "--tag", "craft-url"], {
      ...D.env,
      FORKD_HUB_URL: "",
    });
    expect(viaUrl).toMatchObject({ tag: "craft-url", registered: ["craft-url"] });
    const unknown = await forkd(["pull", "acme/nope", "--hub", `${hubUrl}/registry.json`], D.env);
    expect(unknown.stderr).toMatch(
      /no snapshot acme\/nope in the hub index at http:\/\/127\.0\.0\.1:\d+\/registry\.json \(it lists acme\/ok\)/,
    );
    expect(registered(D)).toEqual(["craft-ok", "craft-url"]);
  });

  it("refuses a pack whose sha256 differs from the hub index's", async () => {
    const { pack } = await craftPack("craft-sha");
    await refused("sha", pack, /the pack at .* does not match its sha256/, sha256("something else"));
  });

  it("refuses a truncated pack", async () => {
    const { pack } = await craftPack("craft-cut");
    await refused("cut", pack.subarray(0, Math.floor(pack.length * 0.6)), /damaged, cut short or not a forkd pack/);
  });

  it("refuses a pack with a ../ member and writes nothing outside", async () => {
    const { pack } = await craftPack("craft-dotdot", (entries) => [
      entries[0]!,
      { name: "../../escape.txt", data: Buffer.from("out") },
      ...entries.slice(1),
    ]);
    await refused("dotdot", pack, /member \.\.\/\.\.\/escape\.txt is not in its index/);
    const { pack: named } = await craftPack("craft-dotdot2", (entries) => {
      const index = JSON.parse(entries[0]!.data!.toString());
      index.files[0].path = "snapshots/../../escape.txt";
      return [{ name: "forkd-pack.json", data: Buffer.from(JSON.stringify(index)) }, ...entries.slice(1)];
    });
    await refused("dotdot2", named, /names a member 'snapshots\/\.\.\/\.\.\/escape\.txt' forkd never writes/);
    for (const dir of [D.home, path.dirname(D.home), path.join(D.home, "snapshots")])
      expect(fs.existsSync(path.join(dir, "escape.txt"))).toBe(false);
  });

  it("refuses a pack whose member bytes do not match the index sha256", async () => {
    const { pack } = await craftPack("craft-bytes", (entries) =>
      entries.map((e) => (e.name.endsWith("/memory.bin") ? { ...e, data: Buffer.from(e.data!).fill(9, 100, 200) } : e)),
    );
    await refused("bytes", pack, /memory\.bin does not match its sha256 in the index/);
  });

  it("refuses a symlink member", async () => {
    const { pack } = await craftPack("craft-link", (entries) =>
      entries.map((e) => (e.name.endsWith("/memory.bin") ? { name: e.name, type: "symlink" as const, linkname: "/etc/shadow" } : e)),
    );
    await refused("link", pack, /member snapshots\/craft-link\/memory\.bin is a symlink, not a plain file/);
  });
});
