// MCP progress notifications for calls that take seconds (fork, BRANCH, snapshot,
// wait_for_text), sent only when the client asked for them with a progressToken.
import type { RequestHandlerExtra } from "@modelcontextprotocol/sdk/shared/protocol.js";
import type { ServerNotification, ServerRequest } from "@modelcontextprotocol/sdk/types.js";

export type ToolExtra = RequestHandlerExtra<ServerRequest, ServerNotification>;

/** How often a call the daemon answers in one piece says it is still going. */
const HEARTBEAT_MS = 1000;

export class Progress {
  private readonly token: string | number | undefined;
  private last = -1;

  constructor(private readonly extra: ToolExtra) {
    this.token = extra._meta?.progressToken;
  }

  /** The spec wants progress to grow with every notification: a value that would not is nudged up. */
  async report(progress: number, message: string, total?: number | "complete"): Promise<void> {
    if (this.token === undefined) return;
    const value = progress > this.last ? progress : this.last + 0.001;
    this.last = value;
    const outOf = total === "complete" ? value : total;
    try {
      await this.extra.sendNotification({
        method: "notifications/progress",
        params: { progressToken: this.token, progress: value, ...(outOf !== undefined ? { total: outOf } : {}), message },
      });
    } catch {
      // a client that went away cannot be told; the call itself decides the outcome
    }
  }

  /**
   * Report elapsed seconds while `work` runs: the daemon answers fork, BRANCH and
   * snapshot in one response, so time is the only honest measure of progress.
   */
  async during<T>(work: Promise<T>, what: string): Promise<T> {
    if (this.token === undefined) return work;
    const t0 = performance.now();
    const seconds = () => (performance.now() - t0) / 1000;
    await this.report(0, `${what}: started`);
    // report() never rejects (a client that went away cannot be told); the catch is for a bug in it.
    const heartbeat = () => {
      this.report(seconds(), `${what}: ${seconds().toFixed(1)} s`).catch((err: Error) =>
        process.stderr.write(`forkd mcp: progress heartbeat failed: ${err.message}\n`),
      );
    };
    const timer = setInterval(heartbeat, HEARTBEAT_MS);
    let result: T;
    try {
      result = await work;
    } finally {
      // Stopped before the last word, so no heartbeat can follow "done".
      clearInterval(timer);
    }
    const done = seconds();
    await this.report(done, `${what}: done in ${done.toFixed(1)} s`, "complete");
    return result;
  }
}
