import { createRequire } from "node:module";
import { inspect } from "node:util";
import vm from "node:vm";
import type { EvalRequest, EvalResult } from "../protocol.js";
import { AgentOpError } from "./errors.js";

const DEFAULT_EVAL_TIMEOUT_MS = 30_000;
/** Compiled scripts kept for code that is evaluated again (agents often repeat small snippets). */
const SCRIPT_CACHE_ENTRIES = 128;
const SCRIPT_CACHE_MAX_SOURCE = 64 * 1024;

/**
 * One persistent JavaScript context per agent: variables defined by one call are
 * there for the next, and because the agent is snapshotted with the VM, a child
 * forked from a warm parent inherits whatever the warm-up loaded.
 */
export class JsEvaluator {
  private readonly context: vm.Context;
  private readonly scripts = new Map<string, vm.Script>();

  constructor() {
    const sandboxRequire = createRequire("/root/");
    this.context = vm.createContext({
      console,
      require: sandboxRequire,
      process: processWithoutExit(),
      Buffer,
      setTimeout,
      clearTimeout,
      setInterval,
      clearInterval,
      setImmediate,
      queueMicrotask,
      structuredClone,
      TextEncoder,
      TextDecoder,
      URL,
      fetch: globalThis.fetch,
      performance,
    });
  }

  private compile(code: string): vm.Script {
    const cached = this.scripts.get(code);
    if (cached) {
      // Refresh its place in the LRU order.
      this.scripts.delete(code);
      this.scripts.set(code, cached);
      return cached;
    }
    const script = new vm.Script(code, { filename: "eval.js" });
    if (code.length <= SCRIPT_CACHE_MAX_SOURCE) {
      this.scripts.set(code, script);
      if (this.scripts.size > SCRIPT_CACHE_ENTRIES) this.scripts.delete(this.scripts.keys().next().value as string);
    }
    return script;
  }

  async evaluate(request: EvalRequest, signal: AbortSignal): Promise<EvalResult> {
    if (typeof request.code !== "string") throw new AgentOpError("bad_request", "`code` must be a string");
    if (request.language !== undefined && request.language !== "javascript") {
      throw new AgentOpError("bad_request", `language '${String(request.language)}' is not available in this image; it has: javascript`);
    }
    const timeoutMs = request.timeoutMs ?? DEFAULT_EVAL_TIMEOUT_MS;
    if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) {
      throw new AgentOpError("bad_request", "`timeoutMs` must be a positive integer");
    }
    const started = performance.now();
    let value: unknown;
    try {
      const script = this.compile(request.code);
      // `timeout` interrupts synchronous loops; awaited promises are raced below.
      value = script.runInContext(this.context, { timeout: timeoutMs, breakOnSigint: false });
      if (isThenable(value)) value = await raceTimeout(value, timeoutMs, signal);
    } catch (err) {
      if (err instanceof AgentOpError) throw err;
      const e = err as Error & { code?: string };
      if (e?.code === "ERR_SCRIPT_EXECUTION_TIMEOUT") {
        throw new AgentOpError("timeout", `eval ran longer than ${timeoutMs} ms and was interrupted`);
      }
      throw new AgentOpError("eval_error", `${e?.name ?? "Error"}: ${e?.message ?? String(err)}`, {
        name: e?.name ?? "Error",
        stack: typeof e?.stack === "string" ? e.stack : undefined,
      });
    }
    return { ...toWire(value), durationMs: performance.now() - started };
  }
}

/**
 * The agent's own process, except that exit and abort throw: eval runs inside the
 * agent, so `process.exit()` there ended the agent and the call waited for its deadline.
 * Every other property (env, cwd, on, …) is the real one.
 */
function processWithoutExit(): NodeJS.Process {
  const refuse = (name: string) => () => {
    throw new Error(
      `process.${name}() is not available in eval: it would end the guest agent that runs every call; run a program that exits with exec instead`,
    );
  };
  const refused = new Map(["exit", "abort", "reallyExit"].map((name) => [name, refuse(name)]));
  return new Proxy(process, { get: (target, key) => (typeof key === "string" && refused.get(key)) || Reflect.get(target, key) });
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof (value as { then?: unknown } | null)?.then === "function";
}

function raceTimeout(value: PromiseLike<unknown>, timeoutMs: number, signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new AgentOpError("timeout", `eval's promise did not settle within ${timeoutMs} ms`)), timeoutMs);
    const onAbort = () => reject(new AgentOpError("cancelled", "eval was cancelled by the host"));
    signal.addEventListener("abort", onAbort, { once: true });
    Promise.resolve(value)
      .then(resolve, reject)
      .finally(() => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
      });
  });
}

/** JSON when the value survives a round trip, otherwise its inspected text. */
function toWire(value: unknown): { value: unknown; type: string } {
  const type = value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
  if (value === undefined) return { value: null, type };
  if (typeof value === "function" || typeof value === "symbol" || typeof value === "bigint") {
    return { value: inspect(value), type };
  }
  try {
    const json = JSON.stringify(value);
    if (json === undefined) return { value: inspect(value), type };
    return { value: JSON.parse(json), type };
  } catch {
    return { value: inspect(value, { depth: 4 }), type };
  }
}
