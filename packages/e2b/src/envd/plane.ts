// The envd plane: what E2B's SDKs send to a sandbox (the request carries
// `E2b-Sandbox-Id`), served on the daemon's own port from the sandbox's agent.
//   GET  /health                     204 while the sandbox runs, 502 once it does not
//   GET  /files, POST /files         download / upload (a signed URL names no sandbox: its signature finds it)
//   POST /process.Process/*          Start, Connect (server streams), List, SendInput, SendSignal, CloseStdin, Update
//   POST /filesystem.Filesystem/*    Stat, ListDir, MakeDir, Move, Remove, WatchDir (stream), the watcher trio
// It takes raw Node requests: the daemon hands them over untouched (bodies unread),
// since Connect's envelopes, multipart and gzip bodies are read here, as streams.
import type { IncomingMessage, ServerResponse } from "node:http";
import { ConnectError, type RpcKind, readRequest, ServerStream, sendUnaryError } from "./connect.js";
import { type EnvdDeps, type EnvdSandbox, hasAccess, OpenStreams, toConnectError } from "./context.js";
import { getFile, postFiles, restStatus, sandboxBySignature, sendJsonError } from "./files.js";
import { isFilesystemMethod, serveFilesystem, Watchers } from "./filesystem.js";
import { isProcessMethod, serveProcess } from "./process.js";

const SANDBOX_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;

export type EnvdPlane = {
  /** Serve one request meant for sandbox `sandboxId` (the E2b-Sandbox-Id header), or for none (a signed /files URL). */
  handle(req: IncomingMessage, res: ServerResponse, sandboxId: string | undefined): Promise<void>;
  /** End every stream and watcher open on a sandbox, at once: it was killed or paused. */
  endSandboxStreams(sandboxId: string, why: string): void;
};

export function createEnvdPlane(deps: EnvdDeps): EnvdPlane {
  const streams = new OpenStreams();
  const watchers = new Watchers(streams);

  const serveRpc = async (req: IncomingMessage, res: ServerResponse, sandbox: EnvdSandbox | undefined, service: string, method: string) => {
    const kind: RpcKind | undefined =
      service === "process.Process"
        ? isProcessMethod(method)
        : service === "filesystem.Filesystem"
          ? isFilesystemMethod(method)
          : undefined;
    // A stream's failure travels as an end-stream message in a 200: its HTTP status would lose the code.
    const fail = (err: unknown) => {
      const e = toConnectError(err);
      if (kind === "server_stream" && !res.headersSent) new ServerStream(res).end(e);
      else if (kind === "server_stream") res.destroy();
      else sendUnaryError(res, e);
      req.resume();
    };
    try {
      if (!kind) throw new ConnectError("unimplemented", `${service}/${method} is not served by forkd`);
      if (req.method !== "POST") throw new ConnectError("unimplemented", "Connect calls are POSTs");
      if (!sandbox?.running) throw new ConnectError("unavailable", "the sandbox is not running (paused, killed or never created)");
      if (!hasAccess(req, sandbox)) throw new ConnectError("unauthenticated", "unauthorized access, please provide a valid access token");
      const message = await readRequest(req, kind);
      const call = { req, res, sandbox, message, deps, streams };
      if (service === "process.Process") await serveProcess(method, call);
      else await serveFilesystem(method, call, watchers);
    } catch (err) {
      fail(err);
    }
  };

  const serveRest = async (req: IncomingMessage, res: ServerResponse, sandbox: EnvdSandbox | undefined, url: URL) => {
    try {
      if (!sandbox?.running) throw new ConnectError("unavailable", "the sandbox is not running (paused, killed or never created)");
      const agent = await deps.agent(sandbox.id);
      if (req.method === "GET") await getFile(req, res, sandbox, agent, url);
      else await postFiles(req, res, sandbox, agent, url);
    } catch (err) {
      const e = toConnectError(err);
      req.resume();
      sendJsonError(res, restStatus(e), e.message);
    }
  };

  return {
    async handle(req, res, sandboxId) {
      const url = new URL(req.url ?? "/", "http://envd.invalid");
      const method = req.method ?? "GET";
      if (sandboxId !== undefined && !SANDBOX_ID_RE.test(sandboxId)) {
        req.resume();
        sendJsonError(res, 400, "E2b-Sandbox-Id is not a sandbox id");
        return;
      }
      const isFiles = url.pathname === "/files" && (method === "GET" || method === "POST");
      let sandbox = sandboxId === undefined ? undefined : deps.sandbox(sandboxId);
      if (sandboxId === undefined && isFiles) sandbox = sandboxBySignature(deps, url, method === "GET" ? "read" : "write");
      if (url.pathname === "/health" && method === "GET") {
        req.resume();
        if (sandbox?.running) {
          res.writeHead(204);
          res.end();
        } else sendJsonError(res, 502, "the sandbox is not running");
        return;
      }
      if (isFiles) {
        if (sandboxId === undefined && !sandbox) {
          req.resume();
          sendJsonError(res, 401, "a /files URL without E2b-Sandbox-Id needs a valid signature");
          return;
        }
        await serveRest(req, res, sandbox, url);
        return;
      }
      const rpc = /^\/([a-z]+\.[A-Za-z]+)\/([A-Za-z]+)$/.exec(url.pathname);
      if (rpc) {
        await serveRpc(req, res, sandbox, rpc[1]!, rpc[2]!);
        return;
      }
      req.resume();
      sendJsonError(res, 404, `${method} ${url.pathname.slice(0, 100)} is not an envd route forkd serves`);
    },
    endSandboxStreams(sandboxId, why) {
      streams.endAll(sandboxId, why);
    },
  };
}
