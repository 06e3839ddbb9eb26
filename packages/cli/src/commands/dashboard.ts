// `forkd ui`: the link that opens the dashboard logged in. The token travels in
// the URL's fragment (#token=…), which a browser never sends to the server, so
// it reaches neither the daemon's logs nor a proxy's; the page takes it out of the
// address bar at once and keeps it in session storage.
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { ForkdError, forkdHome, setting } from "@forkd/core";
import { readTokenFile } from "@forkd/daemon";
import type { Command } from "commander";

type UiOpts = { url?: string; tokenFile?: string; open: boolean };

const DEFAULT_URL = "http://127.0.0.1:8889";

/** The dashboard's address for a daemon at `base` (http(s)://HOST:PORT), logged in with `token`. */
export function dashboardLink(base: string, token: string): string {
  const url = new URL(base);
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new ForkdError("bad_request", `the dashboard is served over TCP: give http://HOST:PORT or https://HOST:PORT, not ${base}`);
  }
  return `${url.origin}/ui#token=${encodeURIComponent(token)}`;
}

/** Where a browser can be opened: a graphical session with xdg-open on the PATH. */
function browserOpener(): string | undefined {
  // biome-ignore lint/style/noProcessEnv: whether a display exists is the environment's to say, not a forkd setting
  const env = process.env;
  if (!env.DISPLAY && !env.WAYLAND_DISPLAY) return undefined;
  for (const dir of (env.PATH ?? "").split(":")) {
    const candidate = path.join(dir, "xdg-open");
    if (dir && fs.existsSync(candidate)) return candidate;
  }
  return undefined;
}

export function registerDashboard(program: Command): void {
  program
    .command("ui")
    .description("print the dashboard's link (http://HOST:PORT/ui#token=…, which logs in) and open it where a browser exists")
    .option("--url <url>", `the daemon's TCP address (default FORKD_URL when it is http(s), else ${DEFAULT_URL})`)
    .option("--token-file <file>", "the daemon's token (default FORKD_TOKEN, else $FORKD_HOME/token)")
    .option("--no-open", "only print the link")
    .action(async (opts: UiOpts) => {
      const configured = setting("url");
      const base = opts.url ?? (configured && /^https?:/.test(configured) ? configured : DEFAULT_URL);
      const token = opts.tokenFile ? readTokenFile(opts.tokenFile) : (setting("token") ?? readTokenFile(path.join(forkdHome(), "token")));
      const link = dashboardLink(base, token);
      process.stdout.write(`${link}\n`);
      const reachable = await fetch(new URL("/healthz", base), { signal: AbortSignal.timeout(3000) }).then(
        (r) => r.ok,
        () => false,
      );
      if (!reachable) process.stderr.write(`forkd ui: no daemon answers at ${base} yet; start one with \`forkd daemon\`\n`);
      const opener = opts.open ? browserOpener() : undefined;
      if (opener) {
        // Detached: the browser outlives this command.
        spawn(opener, [link], { detached: true, stdio: "ignore" }).unref();
        process.stderr.write("forkd ui: opened in your browser\n");
      }
    });
}
