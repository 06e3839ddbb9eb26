// The dashboard's static files at /ui (built by @forkd/dashboard). They hold no
// secret, so they are served without the token; the page logs in and every call
// it makes is an ordinary authenticated API call. No inline script is allowed by
// the Content-Security-Policy, and nothing is fetched from anywhere but here.
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { ForkdError } from "@forkd/core";
import type { RouteDeps } from "./context.js";

/** Scripts only from this origin and no inline ones; the page talks only to this daemon. */
const UI_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  // xterm and cytoscape set element styles at run time (CSSOM); no markup styles come from guests.
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data: blob:",
  "font-src 'self'",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join("; ");

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
};

/** The built page's directory, or undefined when @forkd/dashboard is not built. */
function uiDir(): string | undefined {
  try {
    return path.dirname(createRequire(import.meta.url).resolve("@forkd/dashboard/index.html"));
  } catch {
    return undefined;
  }
}

/** Whether a request path is the dashboard's (served without the token). */
export function isUiPath(url: string): boolean {
  const p = url.split("?")[0] ?? url;
  return p === "/ui" || p.startsWith("/ui/");
}

export function registerUiRoutes({ app }: RouteDeps): void {
  const dir = uiDir();
  // Only the files the build wrote, known by name at start: no path from a request reaches the filesystem.
  const files = new Map<string, string>();
  if (dir) for (const name of fs.readdirSync(dir)) if (TYPES[path.extname(name)]) files.set(name, path.join(dir, name));
  const serve = (name: string) => {
    const file = files.get(name);
    if (!file) {
      throw new ForkdError("not_found", dir ? `no file ${name} in the dashboard` : "the dashboard is not built; run `npm run build`");
    }
    return { body: fs.readFileSync(file), type: TYPES[path.extname(name)]! };
  };
  app.get("/ui", { schema: { hide: true } }, async (_request, reply) => {
    const { body, type } = serve("index.html");
    return reply
      .header("content-type", type)
      .header("content-security-policy", UI_CSP)
      .header("cache-control", "no-store")
      .header("referrer-policy", "no-referrer")
      .header("x-content-type-options", "nosniff")
      .send(body);
  });
  app.get<{ Params: { file: string } }>("/ui/:file", { schema: { hide: true } }, async (request, reply) => {
    const { body, type } = serve(request.params.file || "index.html");
    return reply
      .header("content-type", type)
      .header("content-security-policy", UI_CSP)
      .header("x-content-type-options", "nosniff")
      .header("cache-control", "no-cache")
      .send(body);
  });
}
