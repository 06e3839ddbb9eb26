// bench pack: how small a pack is against the files it carries, how fast a snapshot
// chain packs and unpacks, and how fast it pushes to and pulls from an OCI registry
// (Debian's docker-registry, started here on loopback with storage in a temp dir).
// Unpack and pull go into empty scratch homes, so every byte is really moved.
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import {
  createSnapshot,
  ForkdError,
  getSnapshot,
  packSnapshot,
  pullSnapshot,
  pushSnapshot,
  removeSnapshot,
  setting,
  unpackFile,
  withSettings,
} from "@forkd/core";
import type { Command } from "commander";
import { parseIntOption, plainTable, spinner } from "../../ui.js";
import { emit, fieldsTable, MIB, machine, round1 } from "./report.js";

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

/** A docker-registry of our own on loopback, storage under `dir`; never the packaged service. */
export async function startRegistry(dir: string): Promise<{ port: number; child: ChildProcess }> {
  const registryBin = setting("dockerRegistry");
  if (!fs.existsSync(registryBin)) {
    throw new ForkdError("missing_dependency", `${registryBin} is not installed: apt-get install docker-registry (npm run setup does)`);
  }
  const port = await freePort();
  const config = [
    "version: 0.1",
    "log:",
    "  level: error",
    "  accesslog:",
    "    disabled: true",
    "storage:",
    "  filesystem:",
    `    rootdirectory: ${path.join(dir, "data")}`,
    "http:",
    `  addr: 127.0.0.1:${port}`,
    `  secret: ${randomBytes(16).toString("hex")}`,
    "",
  ].join("\n");
  fs.writeFileSync(path.join(dir, "config.yml"), config);
  const child = spawn(registryBin, ["serve", path.join(dir, "config.yml")], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (log = (log + d).slice(-4000)));
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    const ok = await fetch(`http://127.0.0.1:${port}/v2/`).then(
      (r) => r.status === 200,
      () => false,
    );
    if (ok) return { port, child };
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  child.kill("SIGKILL");
  throw new ForkdError("internal", `docker-registry did not start: ${log.trim().slice(-1000)}`);
}

/** Run `fn` with FORKD_HOME (and the staging dir) pointing at a scratch store. */
function inHome<T>(home: string, fn: () => Promise<T>): Promise<T> {
  return withSettings({ home, shmDir: `${home}-shm` }, fn);
}

async function timed<T>(fn: () => Promise<T>): Promise<{ value: T; seconds: number }> {
  const t0 = performance.now();
  const value = await fn();
  return { value, seconds: (performance.now() - t0) / 1000 };
}

const mibPerSecond = (bytes: number, seconds: number) => round1(bytes / MIB / seconds);

export function registerPackBench(bench: Command): void {
  bench
    .command("pack")
    .description(
      "pack ratio (pack bytes / logical bytes), pack and unpack MiB/s, push and pull MiB/s against a docker-registry on loopback",
    )
    .option("--tag <tag>", "measure this snapshot (default: boot a fresh one and remove it afterwards)")
    .option("--image <name>", "image of the fresh snapshot", "base")
    .option("--memory-mib <n>", "guest memory of the fresh snapshot", parseIntOption("--memory-mib"), 256)
    .option("--json", "print JSON")
    .action(async (opts: { tag?: string; image: string; memoryMib: number; json?: boolean }) => {
      const s = spinner("preparing");
      const run = randomBytes(3).toString("hex");
      const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "forkd-bench-pack-"));
      let tag = opts.tag;
      let created = false;
      let registry: ChildProcess | undefined;
      try {
        if (!tag) {
          tag = `bench-pack-${run}`;
          s.text = `snapshot ${tag} (${opts.memoryMib} MiB)`;
          await createSnapshot({ tag, image: opts.image, memoryMib: opts.memoryMib });
          created = true;
        }
        const snapshot = await getSnapshot(tag);
        const packFile = path.join(scratch, `${tag}.forkd.tar.zst`);
        s.text = "pack";
        const pack = await timed(() => packSnapshot(tag!, packFile));
        const logical = pack.value.files.reduce((sum, f) => sum + f.size, 0);
        const encoded = pack.value.files.reduce((sum, f) => sum + f.encoded_bytes, 0);
        s.text = "unpack into an empty store";
        const unpack = await timed(() => inHome(path.join(scratch, "unpack-home"), () => unpackFile(packFile)));
        s.text = "starting docker-registry on loopback";
        const reg = await startRegistry(fs.mkdtempSync(path.join(scratch, "registry-")));
        registry = reg.child;
        const ref = `127.0.0.1:${reg.port}/forkd-bench/${tag.toLowerCase().replace(/[^a-z0-9]+/g, "-")}:v1`;
        s.text = "push";
        const push = await timed(() => pushSnapshot(tag!, ref));
        s.text = "push again (every blob already there)";
        const again = await timed(() => pushSnapshot(tag!, ref));
        s.text = "pull into an empty store";
        const pull = await timed(() => inHome(path.join(scratch, "pull-home"), () => pullSnapshot(ref)));
        s.stop();
        const result = {
          ...(await machine(snapshot.accel)),
          tag,
          chain: pack.value.snapshots,
          memory_mib: snapshot.memoryMib,
          logical_bytes: logical,
          encoded_bytes: encoded,
          pack_bytes: pack.value.pack_bytes,
          pack_ratio: Math.round((pack.value.pack_bytes / logical) * 1000) / 1000,
          pack_s: round1(pack.seconds),
          pack_mib_s: mibPerSecond(logical, pack.seconds),
          unpack_s: round1(unpack.seconds),
          unpack_mib_s: mibPerSecond(logical, unpack.seconds),
          push_s: round1(push.seconds),
          push_mib_s: mibPerSecond(logical, push.seconds),
          push_wire_mib_s: mibPerSecond(push.value.uploaded_bytes, push.seconds),
          uploaded_bytes: push.value.uploaded_bytes,
          push_again_s: round1(again.seconds),
          push_again_uploaded_bytes: again.value.uploaded_bytes,
          pull_s: round1(pull.seconds),
          pull_mib_s: mibPerSecond(logical, pull.seconds),
          pull_wire_mib_s: mibPerSecond(pull.value.downloaded_bytes, pull.seconds),
          downloaded_bytes: pull.value.downloaded_bytes,
          note: "MiB/s are of logical bytes (the files as on disk) unless named wire; unpack and pull go into empty stores",
        };
        emit("pack", result, opts, () => {
          const table = plainTable(["STEP", "SECONDS", "MiB/s (logical)", "BYTES MOVED"]);
          const mib = (n: number) => `${round1(n / MIB)} MiB`;
          table.push(["pack", result.pack_s, result.pack_mib_s, mib(result.pack_bytes)] as string[]);
          table.push(["unpack", result.unpack_s, result.unpack_mib_s, mib(result.pack_bytes)] as string[]);
          table.push(["push", result.push_s, result.push_mib_s, mib(result.uploaded_bytes)] as string[]);
          table.push(["push again", result.push_again_s, "-", mib(result.push_again_uploaded_bytes)] as string[]);
          table.push(["pull", result.pull_s, result.pull_mib_s, mib(result.downloaded_bytes)] as string[]);
          return `${table.toString()}\n${fieldsTable(result)}`;
        });
      } finally {
        s.stop();
        registry?.kill("SIGKILL");
        if (created && tag) await removeSnapshot(tag, { force: true }).catch(() => {});
        for (const home of ["unpack-home", "pull-home"]) fs.rmSync(`${path.join(scratch, home)}-shm`, { recursive: true, force: true });
        fs.rmSync(scratch, { recursive: true, force: true });
      }
    });
}
