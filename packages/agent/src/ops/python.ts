import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import fs from "node:fs";
import { createInterface } from "node:readline";
import type { EvalResult } from "../protocol.js";
import { AgentOpError } from "./errors.js";

type WorkerAnswer = {
  id?: number | null;
  ok?: boolean;
  ready?: boolean;
  imports?: string[];
  value?: unknown;
  type?: string;
  stdout?: string;
  text?: string;
  error?: { type: string; message: string; traceback: string };
};

export type PythonWorkerOpts = { python: string; script: string; imports: string };

/**
 * A warm Python interpreter the agent starts once at boot and talks to over a
 * pipe. Calls run one at a time (the interpreter is single-threaded); a call
 * that outlives its timeout kills the worker, which is restarted at once, so
 * the sandbox stays usable (its Python state is lost, and the error says so).
 */
export class PythonWorker {
  private child: ChildProcessWithoutNullStreams | undefined;
  private ready: Promise<string[]> | undefined;
  private readonly waiting = new Map<number, (answer: WorkerAnswer) => void>();
  private nextId = 1;
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: PythonWorkerOpts) {}

  static available(python: string, script: string): boolean {
    return fs.existsSync(python) && fs.existsSync(script);
  }

  start(): Promise<string[]> {
    if (this.ready && this.child && this.child.exitCode === null) return this.ready;
    const child = spawn(this.opts.python, ["-u", this.opts.script], {
      stdio: ["pipe", "pipe", "pipe"],
      env: { ...process.env, FORKD_PY_IMPORTS: this.opts.imports, PYTHONDONTWRITEBYTECODE: "1" },
    });
    this.child = child;
    child.stderr.resume();
    this.ready = new Promise((resolve, reject) => {
      const lines = createInterface({ input: child.stdout });
      lines.on("line", (line) => {
        let answer: WorkerAnswer;
        try {
          answer = JSON.parse(line) as WorkerAnswer;
        } catch {
          return;
        }
        if (answer.ready) {
          resolve(answer.imports ?? []);
          return;
        }
        const waiter = answer.id !== undefined && answer.id !== null ? this.waiting.get(answer.id) : undefined;
        if (waiter) {
          this.waiting.delete(answer.id as number);
          waiter(answer);
        }
      });
      child.on("error", (err) => reject(new AgentOpError("io_error", `the Python worker could not start: ${err.message}`)));
      child.on("exit", (code, signal) => {
        if (this.child === child) this.child = undefined;
        const lost: WorkerAnswer = {
          ok: false,
          error: { type: "WorkerExited", message: `the Python worker exited (${signal ?? code})`, traceback: "" },
        };
        for (const [id, waiter] of this.waiting) {
          this.waiting.delete(id);
          waiter(lost);
        }
        reject(new AgentOpError("io_error", `the Python worker exited (${signal ?? code}) before it was ready`));
      });
    });
    this.ready.catch(() => {});
    return this.ready;
  }

  evaluate(code: string, timeoutMs: number, signal: AbortSignal): Promise<EvalResult> {
    const run = async (): Promise<EvalResult> => {
      await this.start();
      const child = this.child!;
      const id = this.nextId++;
      const started = performance.now();
      const answer = await new Promise<WorkerAnswer | "timeout" | "cancelled">((resolve) => {
        const timer = setTimeout(() => resolve("timeout"), timeoutMs);
        const onAbort = () => resolve("cancelled");
        signal.addEventListener("abort", onAbort, { once: true });
        this.waiting.set(id, (a) => {
          clearTimeout(timer);
          signal.removeEventListener("abort", onAbort);
          resolve(a);
        });
        child.stdin.write(`${JSON.stringify({ id, code })}\n`);
      });
      if (answer === "timeout" || answer === "cancelled") {
        this.waiting.delete(id);
        // The only way to stop running Python code: replace the interpreter.
        child.kill("SIGKILL");
        this.child = undefined;
        void this.start().catch(() => {});
        if (answer === "cancelled")
          throw new AgentOpError("cancelled", "python eval was cancelled; the worker was restarted and its state reset");
        throw new AgentOpError("timeout", `python eval ran longer than ${timeoutMs} ms; the worker was restarted and its state reset`);
      }
      if (!answer.ok) {
        const e = answer.error ?? { type: "Error", message: "unknown error", traceback: "" };
        throw new AgentOpError("eval_error", `${e.type}: ${e.message}`, { name: e.type, traceback: e.traceback });
      }
      return {
        value: answer.value ?? null,
        type: answer.type ?? "NoneType",
        durationMs: performance.now() - started,
        ...(answer.stdout ? { stdout: answer.stdout } : {}),
        ...(typeof answer.text === "string" ? { text: answer.text } : {}),
      } as EvalResult;
    };
    const next = this.chain.then(run, run);
    this.chain = next.catch(() => {});
    return next;
  }
}
