// The python image and its warm worker, against real VMs: built from Debian
// packages (cached between runs), evaluated with notebook semantics, errors,
// timeouts, and the fan-out benchmark at small n as a correctness check.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { AgentCallError, type AgentClient, buildImage, connectSandbox, createSnapshot, forkSandboxes } from "@forkd/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, isolateForkd } from "../helpers/env.js";

const env = isolateForkd();
process.env.FORKD_SHM_DIR = path.join(env.runDir, "shm");
let agent: AgentClient;
let childId: string;

beforeAll(async () => {
  // Images are shared through the real store, so a second run reuses the debootstrapped root.
  const { manifest } = await buildImage({ name: "python" });
  expect(manifest.runtimes).toEqual(["javascript", "python"]);
  await createSnapshot({ tag: "py", image: "python" });
  const [child] = await forkSandboxes({ tag: "py", n: 1 });
  expect(child?.ok).toBe(true);
  childId = child!.id;
  agent = await connectSandbox(childId);
}, 900_000);

afterAll(() => {
  agent?.close();
  spawnSync(process.execPath, [CLI, "kill", "--all"], { env: process.env });
});

const py = (code: string, timeoutMs?: number) =>
  agent.eval(code, { language: "python", ...(timeoutMs ? { evalTimeoutMs: timeoutMs } : {}) });

describe("warm Python worker", () => {
  it("answers numpy from the snapshot's warm imports, with state between calls", async () => {
    expect((await py("numpy.zeros(5).tolist()")).value).toEqual([0, 0, 0, 0, 0]);
    await py("counter = 40");
    const res = await py("print('side effect')\ncounter += 2\ncounter");
    expect(res.value).toBe(42);
    expect(res.stdout).toBe("side effect\n");
  });

  it("returns JSON when it can and the repr otherwise", async () => {
    expect((await py("{'a': [1, 2.5, None]}")).value).toEqual({ a: [1, 2.5, null] });
    const arr = await py("numpy.arange(3)");
    expect(arr.type).toBe("ndarray");
    expect(arr.value).toBe("array([0, 1, 2])");
  });

  it("reports exceptions and syntax errors with type, message and traceback; the worker survives", async () => {
    const err = (await py("1/0").catch((e: unknown) => e)) as AgentCallError;
    expect(err).toBeInstanceOf(AgentCallError);
    expect(err.message).toMatch(/ZeroDivisionError: division by zero/);
    expect(String(err.details.traceback)).toMatch(/Traceback/);
    const syntax = (await py("def broken(:").catch((e: unknown) => e)) as AgentCallError;
    expect(syntax.message).toMatch(/SyntaxError/);
    expect((await py("counter")).value).toBe(42);
  });

  it("interrupts an eval that runs forever, restarts the worker, and stays usable", async () => {
    const err = (await py("while True: pass", 1500).catch((e: unknown) => e)) as AgentCallError;
    expect(err.agentCode).toBe("timeout");
    expect(err.message).toMatch(/restarted/);
    expect((await py("numpy.ones(2).tolist()")).value).toEqual([1, 1]);
    expect((await py("'counter' in globals()")).value).toBe(false);
  });

  it("runs python3 -c as a plain command too", async () => {
    let out = "";
    const res = await agent.exec(
      { argv: ["python3", "-c", "import numpy; print(numpy.zeros(2).tolist())"] },
      { onStdout: (d) => (out += d) },
    );
    expect(res.exitCode).toBe(0);
    expect(out).toBe("[0.0, 0.0]\n");
  });
});

describe("images without Python", () => {
  it("answer a clear error for language python", async () => {
    await createSnapshot({ tag: "js-only" });
    const [child] = await forkSandboxes({ tag: "js-only", n: 1 });
    const jsAgent = await connectSandbox(child!.id);
    try {
      const err = (await jsAgent.eval("1", { language: "python" }).catch((e: unknown) => e)) as Error;
      expect(err.message).toMatch(/language 'python' is not available in this image; it has: javascript/);
    } finally {
      jsAgent.close();
    }
  });

  it("refuse unknown image names and bad package names", () => {
    const run = (args: string[]) => spawnSync(process.execPath, [CLI, "image", "build", ...args], { env: process.env, encoding: "utf8" });
    expect(run(["--name", "ruby"]).stderr).toMatch(/no recipe builds an image named 'ruby'; recipes: base, python/);
    expect(run(["--name", "python", "--packages", "bad name;rm"]).stderr).toMatch(/is not a Debian package name/);
  });
});

describe("images from any root filesystem", () => {
  it("turns a root tarball (as `docker export` makes) into a bootable image", () => {
    const dir = fs.mkdtempSync(path.join(env.runDir, "root-"));
    fs.mkdirSync(path.join(dir, "root/etc"), { recursive: true });
    fs.writeFileSync(path.join(dir, "root/etc/os-release"), "ID=forkd-custom\n");
    fs.symlinkSync("/etc", path.join(dir, "root/evil"));
    const tar = path.join(dir, "root.tar");
    // Its own store, removed with the test's temp dir, not the machine's shared images.
    const ownEnv = { ...process.env, FORKD_HOME: path.join(dir, "home") };
    expect(spawnSync("tar", ["-C", path.join(dir, "root"), "-cf", tar, "."]).status).toBe(0);
    const build = spawnSync(process.execPath, [CLI, "image", "build", "--name", "custom", "--from-tar", tar], {
      env: ownEnv,
      encoding: "utf8",
      timeout: 300_000,
    });
    expect(build.status, build.stderr).toBe(0);
    const run = spawnSync(process.execPath, [CLI, "run", "--image", "custom", "--", "cat", "/etc/os-release"], {
      env: ownEnv,
      encoding: "utf8",
      timeout: 300_000,
    });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toBe("ID=forkd-custom\n");
    expect(
      spawnSync(process.execPath, [CLI, "image", "build", "--name", "custom", "--from-tar", path.join(dir, "missing.tar")], {
        env: ownEnv,
        encoding: "utf8",
      }).stderr,
    ).toMatch(/is not a file/);
  });
});

describe("fan-out benchmark", () => {
  it("runs at small n as a correctness check: every child returns the zeros", () => {
    const res = spawnSync(process.execPath, [CLI, "bench", "fanout", "-n", "4", "--json"], {
      env: process.env,
      encoding: "utf8",
      timeout: 600_000,
    });
    expect(res.status, res.stderr).toBe(0);
    const result = JSON.parse(res.stdout.trim().split("\n").at(-1)!);
    expect(result).toMatchObject({ n: 4, ok: 4, image: "python" });
  });
});
