// E2B's filesystem, through the unmodified `e2b` SDK, against a real daemon and real
// VMs: read and write (text, bytes, streams, several files, gzip both ways, a file
// of several pieces), parents made and owned by the user, list to a
// depth, getInfo (owner, group, mode, Go permission strings, symlink targets),
// makeDir, rename, remove, exists, the SDK's not-found errors, watchDir, signed URLs
// (expiry and tampering refused) and the access token on /files.
import path from "node:path";
import { e2bApiKey } from "@forkd/e2b";
import { type EntryInfo, FileNotFoundError, type FilesystemEvent, Sandbox } from "e2b";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DaemonHandle, startDaemonProcess, stopDaemon } from "../helpers/daemon.js";
import { isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");

let daemon: DaemonHandle;
let sandbox: Sandbox;
const HOME = "/home/user";

beforeAll(async () => {
  daemon = await startDaemonProcess(env.home);
  sandbox = await Sandbox.create("base", {
    apiKey: e2bApiKey(daemon.token),
    apiUrl: daemon.url,
    sandboxUrl: daemon.url,
    requestTimeoutMs: 120_000,
    timeoutMs: 600_000,
  });
}, 600_000);

afterAll(async () => {
  await sandbox?.kill().catch(() => undefined);
  if (daemon) await stopDaemon(daemon);
});

describe("files.write and files.read", () => {
  it("round-trip text and bytes; new parents are made and belong to the user", async () => {
    const info = await sandbox.files.write("deep/er/note.txt", "hello\n");
    expect(info).toMatchObject({ name: "note.txt", path: `${HOME}/deep/er/note.txt` });
    expect(await sandbox.files.read(`${HOME}/deep/er/note.txt`)).toBe("hello\n");
    for (const p of ["deep", "deep/er", "deep/er/note.txt"]) {
      expect((await sandbox.files.getInfo(`${HOME}/${p}`)).owner).toBe("user");
    }
    const bytes = new Uint8Array([0, 1, 2, 255, 254]);
    await sandbox.files.write("/tmp/b.bin", bytes.buffer);
    expect(await sandbox.files.read("/tmp/b.bin", { format: "bytes" })).toEqual(bytes);
    const stream = await sandbox.files.read("/tmp/b.bin", { format: "stream" });
    const chunks: Uint8Array[] = [];
    for await (const c of stream as unknown as AsyncIterable<Uint8Array>) chunks.push(c);
    expect(Buffer.concat(chunks)).toEqual(Buffer.from(bytes));
    expect(await sandbox.files.read("/tmp/b.bin", { format: "blob" }).then((b) => (b as Blob).size)).toBe(5);
    // An empty file is empty text.
    await sandbox.files.write("/tmp/empty", "");
    expect(await sandbox.files.read("/tmp/empty")).toBe("");
  });

  it("writes several files in one multipart request", async () => {
    const written = await sandbox.files.write([
      { path: "/tmp/multi/a.txt", data: "A" },
      { path: "/tmp/multi/b.txt", data: "B" },
    ]);
    expect(written.map((w) => w.path).sort()).toEqual(["/tmp/multi/a.txt", "/tmp/multi/b.txt"]);
    expect(await sandbox.files.read("/tmp/multi/b.txt")).toBe("B");
  });

  it("gzip both ways, and a file of several pieces (1 MiB each through the agent)", async () => {
    const big = Buffer.alloc(3 * 1024 * 1024 + 123);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7919) & 0xff;
    await sandbox.files.write("/tmp/big.bin", new Blob([big]), { gzip: true });
    const back = await sandbox.files.read("/tmp/big.bin", { format: "bytes", gzip: true });
    expect(Buffer.from(back).equals(big)).toBe(true);
    const plain = await sandbox.files.read("/tmp/big.bin", { format: "bytes" });
    expect(plain.length).toBe(big.length);
    const sum = await sandbox.commands.run("md5sum /tmp/big.bin");
    expect(sum.stdout.split(" ")[0]).toBe((await import("node:crypto")).createHash("md5").update(big).digest("hex"));
  });

  it("raises FileNotFoundError for what is not there", async () => {
    await expect(sandbox.files.read("/no/such/file")).rejects.toBeInstanceOf(FileNotFoundError);
    await expect(sandbox.files.getInfo("/no/such/file")).rejects.toBeInstanceOf(FileNotFoundError);
    await expect(sandbox.files.list("/no/such/dir")).rejects.toBeInstanceOf(FileNotFoundError);
    expect(await sandbox.files.exists("/no/such/file")).toBe(false);
    expect(await sandbox.files.exists(`${HOME}/deep`)).toBe(true);
  });
});

describe("entries", () => {
  it("list to a depth, parents first, with owner, group, mode, Go permission strings and times", async () => {
    await sandbox.files.makeDir("/tmp/tree/b/c");
    await sandbox.files.write("/tmp/tree/a.txt", "x");
    await sandbox.files.write("/tmp/tree/b/c/z.txt", "zz");
    const one = await sandbox.files.list("/tmp/tree");
    expect(one.map((e) => e.name)).toEqual(["a.txt", "b"]);
    const all = await sandbox.files.list("/tmp/tree", { depth: 3 });
    expect(all.map((e) => e.path)).toEqual(["/tmp/tree/a.txt", "/tmp/tree/b", "/tmp/tree/b/c", "/tmp/tree/b/c/z.txt"]);
    const file = all[0] as EntryInfo;
    expect(file).toMatchObject({ type: "file", size: 1, mode: 0o644, permissions: "-rw-r--r--", owner: "user", group: "user" });
    expect(file.modifiedTime).toBeInstanceOf(Date);
    expect(Math.abs((file.modifiedTime as Date).getTime() - Date.now())).toBeLessThan(10 * 60_000);
    expect(all[1]).toMatchObject({ type: "dir", permissions: "drwxr-xr-x" });
    expect((await sandbox.files.getInfo("/tmp")).permissions).toBe("dtrwxrwxrwx");
  });

  it("a symlink has its target's type and its resolved absolute target", async () => {
    await sandbox.commands.run("ln -s tree/b /tmp/link-to-b");
    const link = await sandbox.files.getInfo("/tmp/link-to-b");
    expect(link).toMatchObject({ type: "dir", symlinkTarget: "/tmp/tree/b", permissions: "Lrwxrwxrwx" });
  });

  it("makeDir says whether it made the directory; rename and remove do what they say", async () => {
    expect(await sandbox.files.makeDir("/tmp/made/x")).toBe(true);
    expect(await sandbox.files.makeDir("/tmp/made/x")).toBe(false);
    const moved = await sandbox.files.rename("/tmp/made/x", "/tmp/moved/here/x");
    expect(moved).toMatchObject({ name: "x", type: "dir", path: "/tmp/moved/here/x" });
    expect(await sandbox.files.exists("/tmp/made/x")).toBe(false);
    await expect(sandbox.files.rename("/tmp/nothing", "/tmp/else")).rejects.toBeInstanceOf(FileNotFoundError);
    await sandbox.files.remove("/tmp/moved");
    expect(await sandbox.files.exists("/tmp/moved")).toBe(false);
  });
});

describe("watchDir", () => {
  it("reports creates, writes and removes in the directory (recursive when asked) until stopped", async () => {
    await sandbox.files.makeDir("/tmp/w/sub");
    const events: FilesystemEvent[] = [];
    const handle = await sandbox.files.watchDir("/tmp/w", (e) => void events.push(e), { recursive: true, timeoutMs: 0 });
    await sandbox.files.write("/tmp/w/f.txt", "1");
    await sandbox.commands.run("echo more >> /tmp/w/f.txt; touch /tmp/w/sub/inner; rm /tmp/w/f.txt");
    const deadline = Date.now() + 20_000;
    const has = (name: string, type: string) => events.some((e) => e.name === name && e.type === type);
    while (!(has("f.txt", "create") && has("f.txt", "write") && has("f.txt", "remove") && has("sub/inner", "create"))) {
      if (Date.now() > deadline) throw new Error(`events so far: ${JSON.stringify(events)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await handle.stop();
    await expect(sandbox.files.watchDir("/tmp/not-there", () => undefined)).rejects.toBeInstanceOf(FileNotFoundError);
  });
});

describe("signed URLs and the access token on /files", () => {
  // A signed URL is its own credential (no X-Access-Token). The SDK builds it from
  // E2B_SANDBOX_URL without the sandbox's id, and a user fetches it with no header at
  // all: the daemon routes it to the envd plane, which finds the sandbox by the signature.
  it("download and upload URLs work with no access token and no header; a tampered or expired signature is refused", async () => {
    const headers = {};
    await sandbox.files.write("/tmp/signed.txt", "secret");
    const url = await sandbox.downloadUrl("/tmp/signed.txt");
    expect(url).toMatch(/signature=v1_/);
    const res = await fetch(url, { headers });
    expect(res.status).toBe(200);
    expect(await res.text()).toBe("secret");
    const tampered = new URL(url);
    tampered.searchParams.set("path", "/etc/shadow");
    expect((await fetch(tampered, { headers })).status).toBe(401);
    const up = await sandbox.uploadUrl("/tmp/uploaded.txt");
    const form = new FormData();
    form.append("file", new Blob(["from a url"]), "ignored-name");
    expect((await fetch(up, { method: "POST", body: form, headers })).status).toBe(200);
    expect(await sandbox.files.read("/tmp/uploaded.txt")).toBe("from a url");
    const soon = await sandbox.downloadUrl("/tmp/signed.txt", { useSignatureExpiration: 1 });
    await new Promise((r) => setTimeout(r, 2500));
    expect((await fetch(soon, { headers })).status).toBe(401);
  });

  it("refuses /files with a wrong access token, or with neither token nor signature", async () => {
    const base = `${daemon.url}/files?path=/tmp/signed.txt`;
    expect((await fetch(base, { headers: { "e2b-sandbox-id": sandbox.sandboxId, "x-access-token": "wrong" } })).status).toBe(401);
    expect((await fetch(base, { headers: { "e2b-sandbox-id": sandbox.sandboxId } })).status).toBe(401);
  });
});
