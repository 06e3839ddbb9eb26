// The agent's E2B-facing ops with real files and processes and no VM (the tests run as
// root, like the agent): `fs` entries (owner names, Go permission strings, symlinks
// with their resolved targets), walks, mkdir/move/write owned by a user, reads in
// pieces; `watch` events; and proc_start as a user, with E2B's environment and a
// closed stdin; proc_attach from now.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { FsEntry, ResponseFrame } from "@forkd/agent/protocol";
import { AgentServer } from "@forkd/agent/server";
import { afterAll, describe, expect, it } from "vitest";

function harness() {
  const frames: ResponseFrame[] = [];
  const waiters: (() => void)[] = [];
  const server = new AgentServer((frame) => {
    frames.push(frame);
    for (const w of waiters.splice(0)) w();
  });
  let nextId = 1;
  const result = async (id: number) => {
    for (;;) {
      const done = frames.find((f) => f.id === id && f.kind !== "chunk");
      if (done) return done;
      await new Promise<void>((r) => waiters.push(r));
    }
  };
  const send = (message: Record<string, unknown>) => {
    const id = nextId++;
    server.handle({ ...message, id });
    return id;
  };
  const value = async <T = Record<string, unknown>>(message: Record<string, unknown>): Promise<T> => {
    const res = await result(send(message));
    if (res.kind !== "result") throw new Error(`${String(message.op)}: ${JSON.stringify(res)}`);
    return res.value as T;
  };
  const error = async (message: Record<string, unknown>) => {
    const res = await result(send(message));
    if (res.kind !== "error") throw new Error(`expected an error, got ${JSON.stringify(res)}`);
    return res.code;
  };
  const output = (id: number) =>
    frames
      .filter((f) => f.id === id && f.kind === "chunk" && f.stream === "stdout")
      .map((f) => Buffer.from((f as { data: string }).data, "base64").toString())
      .join("");
  const waitFor = async (what: () => boolean, ms = 10_000) => {
    const deadline = Date.now() + ms;
    while (!what()) {
      if (Date.now() > deadline) throw new Error("timed out waiting");
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  return { server, send, value, error, output, result, waitFor };
}

const root = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-agent-fs-"));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const NOBODY = 65534;

describe("the agent's fs op", () => {
  it("describes files, directories and symlinks as envd does", async () => {
    const h = harness();
    const dir = path.join(root, "info");
    fs.mkdirSync(path.join(dir, "sub"), { recursive: true });
    fs.writeFileSync(path.join(dir, "f.txt"), "hello");
    fs.chmodSync(path.join(dir, "f.txt"), 0o640);
    fs.chmodSync(path.join(dir, "sub"), 0o1777);
    fs.symlinkSync("sub", path.join(dir, "link"));
    fs.symlinkSync("/nonexistent/target", path.join(dir, "dangling"));
    const info = async (p: string) => (await h.value<{ entry: FsEntry }>({ op: "fs", action: "info", path: p })).entry;
    const f = await info(path.join(dir, "f.txt"));
    expect(f).toMatchObject({ name: "f.txt", type: "file", size: 5, mode: 0o640, permissions: "-rw-r-----", owner: "root", group: "root" });
    expect(f.symlinkTarget).toBeUndefined();
    expect(await info(path.join(dir, "sub"))).toMatchObject({ type: "dir", mode: 0o777, permissions: "dtrwxrwxrwx" });
    // A symlink has its target's type and bits, its own permission string, and its target resolved and absolute.
    expect(await info(path.join(dir, "link"))).toMatchObject({
      type: "dir",
      mode: 0o777,
      permissions: "Lrwxrwxrwx",
      symlinkTarget: path.join(fs.realpathSync(dir), "sub"),
    });
    expect(await info(path.join(dir, "dangling"))).toMatchObject({ type: "other", permissions: "Lrwxrwxrwx" });
    expect((await info("/dev/null")).permissions).toBe("Dcrw-rw-rw-");
    expect(await h.error({ op: "fs", action: "info", path: path.join(dir, "missing") })).toBe("not_found");
    // Relative paths and ~ are the user's home.
    expect((await h.value<{ entry: FsEntry }>({ op: "fs", action: "info", path: "~", user: "root" })).entry.path).toBe("/root");
    expect(await h.error({ op: "fs", action: "info", path: "x", user: "no-such-user" })).toBe("not_found");
    expect(await h.error({ op: "fs", action: "info", path: "x", user: "bad name;" })).toBe("bad_request");
  });

  it("walks to a depth, parents before children, in name order, not into symlinks", async () => {
    const h = harness();
    const dir = path.join(root, "walk");
    fs.mkdirSync(path.join(dir, "b/c/d"), { recursive: true });
    fs.writeFileSync(path.join(dir, "a"), "");
    fs.writeFileSync(path.join(dir, "b/z"), "");
    fs.symlinkSync(dir, path.join(dir, "b/loop"));
    const walk = async (depth: number) =>
      (await h.value<{ entries: FsEntry[] }>({ op: "fs", action: "walk", path: dir, depth })).entries.map((e) =>
        path.relative(dir, e.path),
      );
    expect(await walk(1)).toEqual(["a", "b"]);
    expect(await walk(2)).toEqual(["a", "b", "b/c", "b/loop", "b/z"]);
    expect(await walk(9)).toEqual(["a", "b", "b/c", "b/c/d", "b/loop", "b/z"]);
    expect(await h.error({ op: "fs", action: "walk", path: path.join(dir, "a"), depth: 1 })).toBe("not_a_directory");
    expect(await h.error({ op: "fs", action: "walk", path: dir, depth: 0 })).toBe("bad_request");
  });

  it("makes directories, moves and writes as the user: new parents and files are theirs", async () => {
    const h = harness();
    const dir = path.join(root, "own");
    const made = await h.value<{ entry: FsEntry }>({ op: "fs", action: "mkdir", path: path.join(dir, "x/y"), user: "nobody" });
    expect(made.entry).toMatchObject({ type: "dir", owner: "nobody" });
    expect(fs.statSync(path.join(dir, "x")).uid).toBe(NOBODY);
    expect(await h.error({ op: "fs", action: "mkdir", path: path.join(dir, "x/y"), user: "nobody" })).toBe("exists");
    const w = await h.value<{ entry: { path: string } }>({
      op: "fs",
      action: "write",
      path: path.join(dir, "new/deep/f"),
      data: Buffer.from("one").toString("base64"),
      user: "nobody",
    });
    expect(w.entry).toEqual({ name: "f", type: "file", path: path.join(dir, "new/deep/f") });
    await h.value({
      op: "fs",
      action: "write",
      path: path.join(dir, "new/deep/f"),
      data: Buffer.from("two").toString("base64"),
      append: true,
      user: "nobody",
    });
    expect(fs.readFileSync(path.join(dir, "new/deep/f"), "utf8")).toBe("onetwo");
    for (const p of ["new", "new/deep", "new/deep/f"]) expect(fs.statSync(path.join(dir, p)).uid).toBe(NOBODY);
    const moved = await h.value<{ entry: FsEntry }>({
      op: "fs",
      action: "move",
      path: path.join(dir, "new/deep/f"),
      to: path.join(dir, "m/n/g"),
      user: "nobody",
    });
    expect(moved.entry).toMatchObject({ name: "g", type: "file", size: 6 });
    expect(fs.statSync(path.join(dir, "m")).uid).toBe(NOBODY);
    expect(await h.error({ op: "fs", action: "move", path: path.join(dir, "gone"), to: path.join(dir, "z") })).toBe("not_found");
    await h.value({ op: "fs", action: "remove", path: path.join(dir, "m") });
    expect(fs.existsSync(path.join(dir, "m"))).toBe(false);
    await h.value({ op: "fs", action: "remove", path: path.join(dir, "m") }); // Not there: not an error, as in envd.
    expect(await h.error({ op: "fs", action: "write", path: dir, data: "" })).toBe("is_a_directory");
  });

  it("reads a file in pieces, reporting its whole size", async () => {
    const h = harness();
    const file = path.join(root, "big");
    fs.writeFileSync(file, Buffer.from("0123456789"));
    const r = await h.value<{ size: number; data: string }>({ op: "fs", action: "read", path: file, offset: 4, length: 3 });
    expect(r.size).toBe(10);
    expect(Buffer.from(r.data, "base64").toString()).toBe("456");
    const end = await h.value<{ data: string }>({ op: "fs", action: "read", path: file, offset: 20 });
    expect(end.data).toBe("");
    expect(await h.error({ op: "fs", action: "read", path: root })).toBe("is_a_directory");
  });
});

describe("the agent's watch op", () => {
  it("starts with the directory, then reports create, write, chmod and remove, until cancelled", async () => {
    const h = harness();
    const dir = path.join(root, "watched");
    fs.mkdirSync(dir);
    const id = h.send({ op: "watch", path: dir });
    await h.waitFor(() => h.output(id).includes('"start"'));
    const events = () =>
      h
        .output(id)
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as { type: string; name?: string; path?: string });
    expect(events()[0]).toEqual({ type: "start", path: dir });
    fs.writeFileSync(path.join(dir, "f"), "x");
    await h.waitFor(() => events().some((e) => e.type === "create" && e.name === "f"));
    await new Promise((r) => setTimeout(r, 50));
    fs.appendFileSync(path.join(dir, "f"), "more");
    await h.waitFor(() => events().some((e) => e.type === "write" && e.name === "f"));
    await new Promise((r) => setTimeout(r, 50));
    fs.chmodSync(path.join(dir, "f"), 0o600);
    await h.waitFor(() => events().some((e) => e.type === "chmod" && e.name === "f"));
    fs.rmSync(path.join(dir, "f"));
    await h.waitFor(() => events().some((e) => e.type === "remove" && e.name === "f"));
    h.send({ op: "cancel", target: id });
    expect((await h.result(id)).kind).toBe("error");
    expect(await h.error({ op: "watch", path: path.join(dir, "missing") })).toBe("not_found");
  });
});

describe("proc_start as a user", () => {
  it("runs as the user with E2B's environment over which env goes, stdin closed when asked", async () => {
    const h = harness();
    const info = await h.value<{ pid: number; user?: string }>({
      op: "proc_start",
      argv: ["/bin/sh", "-c", 'echo "$(id -u) $(pwd) $HOME $USER $LOGNAME $FOO $(printenv TERM || echo none)"; cat'],
      env: { FOO: "bar" },
      cwd: "/tmp",
      user: "nobody",
      stdinOpen: false,
    });
    expect(info.user).toBe("nobody");
    const attach = h.send({ op: "proc_attach", pid: info.pid });
    // `cat` ends at once: its stdin was closed at the start.
    expect(await h.result(attach)).toMatchObject({ kind: "result", value: { exitCode: 0 } });
    expect(h.output(attach)).toBe("65534 /tmp /nonexistent nobody nobody bar none\n");
    // Without a cwd it starts in the user's home, which for nobody does not exist.
    expect(await h.error({ op: "proc_start", argv: ["true"], user: "nobody" })).toBe("not_found");
  });

  it("an attach from now skips what the process wrote before it", async () => {
    const h = harness();
    const info = await h.value<{ pid: number }>({ op: "proc_start", cmd: "echo before; read x; echo after" });
    await h.waitFor(() => false, 300).catch(() => undefined);
    const attach = h.send({ op: "proc_attach", pid: info.pid, fromNow: true });
    await new Promise((r) => setTimeout(r, 100));
    await h.value({ op: "proc_stdin", pid: info.pid, data: Buffer.from("\n").toString("base64") });
    expect(await h.result(attach)).toMatchObject({ kind: "result", value: { exitCode: 0, droppedBytes: 0 } });
    expect(h.output(attach)).toBe("after\n");
  });
});
