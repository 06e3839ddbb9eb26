// The CLI talks to the daemon when one is reachable (it owns the sandboxes' agent
// connections then), and to core directly otherwise. One interface, two
// implementations, so every command prints the same either way.
import fs from "node:fs";
import net from "node:net";
import { clientSocketPath, setting } from "@forkd/core/settings";
import type { Backend } from "./backend-types.js";

export type * from "./backend-types.js";

/**
 * FORKD_URL (with FORKD_TOKEN) names a daemon explicitly, and then it must answer.
 * Otherwise a daemon on the default socket is used when it accepts a connection (a
 * stale socket file refuses it); with none, the CLI works on core directly.
 */
export async function openBackend(): Promise<Backend> {
  const socket = clientSocketPath();
  if (setting("url") || (fs.existsSync(socket) && (await accepts(socket)))) {
    const { DaemonBackend, configuredController } = await import("./backend-daemon.js");
    return new DaemonBackend(configuredController());
  }
  const { DirectBackend } = await import("./backend-direct.js");
  return new DirectBackend();
}

/** A bare connect, not an HTTP round trip through the daemon: as much again as a short command's own call. */
export function accepts(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const conn = net.connect(socket);
    conn.once("connect", () => {
      conn.destroy();
      resolve(true);
    });
    conn.once("error", () => resolve(false));
  });
}
