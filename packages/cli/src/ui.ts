import { ForkdError } from "@forkd/core/errors";
import Table from "cli-table3";
import type { Ora } from "ora";

/** What the commands use of a spinner. */
export type Spinner = { text: string; stop(): void; succeed(text?: string): void; fail(text?: string): void };

/**
 * A spinner on stderr for anything that may take over a second; silent when stderr is
 * not a terminal. ora is loaded in the background (a command never waits for it, and
 * one without a spinner never loads it); what was asked of the spinner meanwhile is
 * done, in order, once it is there.
 */
export function spinner(text: string): Spinner {
  let shown: Ora | undefined;
  const pending: ((o: Ora) => void)[] = [];
  const act = (how: (o: Ora) => void) => {
    if (shown) how(shown);
    else pending.push(how);
  };
  import("ora").then(
    ({ default: ora }) => {
      shown = ora({ text, stream: process.stderr, isEnabled: process.stderr.isTTY === true }).start();
      for (const how of pending.splice(0)) how(shown);
    },
    (err: Error) => process.stderr.write(`forkd: no progress spinner (${err.message})\n`),
  );
  return {
    get text() {
      return text;
    },
    set text(value: string) {
      text = value;
      if (shown) shown.text = value;
    },
    stop: () => act((o) => o.stop()),
    succeed: (t) => act((o) => o.succeed(t)),
    fail: (t) => act((o) => o.fail(t)),
  };
}

export async function withSpinner<T>(text: string, work: (s: Spinner) => Promise<T>, done?: (value: T) => string): Promise<T> {
  const s = spinner(text);
  try {
    const value = await work(s);
    if (done) s.succeed(done(value));
    else s.stop();
    return value;
  } catch (err) {
    s.fail(text);
    throw err;
  }
}

export function fmtMs(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}

export function fmtBytes(bytes: number | undefined): string {
  if (bytes === undefined) return "-";
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  if (bytes >= 2 ** 10) return `${(bytes / 2 ** 10).toFixed(1)} KiB`;
  return `${bytes} B`;
}

/** Print an error the way every command does, and pick the exit status. */
export function reportError(err: unknown): number {
  if (err instanceof ForkdError) {
    process.stderr.write(`forkd: ${err.message} [${err.code}]\n`);
    return err.code === "bad_request" || err.code === "invalid_tag" || err.code === "invalid_id" || err.code === "invalid_setting" ? 2 : 1;
  }
  process.stderr.write(`forkd: unexpected error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  return 1;
}

export function parseIntOption(name: string) {
  return (value: string): number => {
    if (!/^-?\d+$/.test(value)) throw new ForkdError("bad_request", `${name} must be a whole number, got '${value}'`);
    return Number(value);
  };
}

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** A table without colour codes, so piped output stays plain. */
export function plainTable(head: string[]) {
  return new Table({ head, style: { head: [], border: [] } });
}
