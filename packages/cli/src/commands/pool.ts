// `forkd pool`: hot pools, which only a daemon keeps (it restores and refills them).
import fs from "node:fs";
import { ForkdError } from "@forkd/core";
import { clientSocketPath, setting } from "@forkd/core/settings";
import type { Controller } from "@forkd/sdk";
import type { Command } from "commander";
import { configuredController, viaApi } from "../backend-daemon.js";
import { parseIntOption, plainTable } from "../ui.js";

/** The daemon to talk to (FORKD_URL, or one answering on the local socket); a pool needs one. */
export async function daemonController(what: string): Promise<Controller> {
  if (setting("url")) return configuredController();
  const socket = clientSocketPath();
  if (fs.existsSync(socket)) {
    const controller = configuredController();
    try {
      await controller.health();
      return controller;
    } catch {
      await controller.close();
    }
  }
  throw new ForkdError("not_supported", `${what} needs the daemon, which keeps pools filled; start \`forkd daemon\` (or set FORKD_URL)`);
}

type PoolRow = { tag: string; size: number; ready: number; starting: number };

function printPools(rows: PoolRow[], json?: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
    return;
  }
  if (rows.length === 0) {
    process.stdout.write("no hot pools; keep children ready with `forkd pool set TAG --size K`\n");
    return;
  }
  const table = plainTable(["TAG", "SIZE", "READY", "STARTING"]);
  for (const p of rows) table.push([p.tag, p.size, p.ready, p.starting]);
  process.stdout.write(`${table.toString()}\n`);
}

export function registerPool(program: Command): void {
  const pool = program
    .command("pool")
    .description("hot pools: children of a snapshot kept restored and answering, handed out by forks first (needs the daemon)");
  pool
    .command("set")
    .description("keep K children of TAG ready (0 drains the pool); the daemon fills it in the background")
    .argument("<tag>")
    .requiredOption("--size <k>", "children to keep ready", parseIntOption("--size"))
    .option("--wait", "return once the pool is full")
    .option("--json", "print JSON")
    .action(async (tag: string, opts: { size: number; wait?: boolean; json?: boolean }) => {
      const controller = await daemonController("forkd pool");
      try {
        let view = await viaApi(() => controller.setPool(tag, opts.size));
        if (opts.wait && opts.size > 0) view = await viaApi(() => controller.waitForPool(tag));
        printPools([view], opts.json);
      } finally {
        await controller.close();
      }
    });
  pool
    .command("ls")
    .description("every pool: size, ready, starting")
    .option("--json", "print JSON")
    .action(async (opts: { json?: boolean }) => {
      const controller = await daemonController("forkd pool");
      try {
        printPools(await viaApi(() => controller.listPools()), opts.json);
      } finally {
        await controller.close();
      }
    });
  pool
    .command("get")
    .description("one pool")
    .argument("<tag>")
    .option("--json", "print JSON")
    .action(async (tag: string, opts: { json?: boolean }) => {
      const controller = await daemonController("forkd pool");
      try {
        printPools([await viaApi(() => controller.getPool(tag))], opts.json);
      } finally {
        await controller.close();
      }
    });
  pool
    .command("rm")
    .description("remove TAG's pool and kill the children it holds")
    .argument("<tag>")
    .action(async (tag: string) => {
      const controller = await daemonController("forkd pool");
      try {
        await viaApi(() => controller.deletePool(tag));
        process.stdout.write(`removed the pool of ${tag}\n`);
      } finally {
        await controller.close();
      }
    });
}
