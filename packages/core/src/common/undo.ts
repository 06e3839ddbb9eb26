// Teardown as a stack. Each step that acquires something (a runtime dir, a row, a
// VMM, a cgroup) pushes how to give it back, right where it acquires it; on failure
// the stack is unwound newest first and every step runs even when an earlier one
// threw. A hand-ordered catch block instead skips everything after its first step
// that throws, and its order drifts from the order things were acquired in.
import { ForkdError } from "./errors.js";

export type UndoFailure = { step: string; error: unknown };

type Step = { step: string; undo: () => unknown };

export class UndoStack {
  private steps: Step[] = [];

  /**
   * Remember how to undo what was just acquired. The returned function does that
   * step now, once, and takes it off the stack (for what is released on the way,
   * like an fd passed to a child process), so unwinding never repeats it.
   */
  push(step: string, undo: () => unknown): () => Promise<void> {
    const entry: Step = { step, undo };
    this.steps.push(entry);
    return async () => {
      const at = this.steps.indexOf(entry);
      if (at === -1) return;
      this.steps.splice(at, 1);
      await entry.undo();
    };
  }

  /** The work succeeded: what was acquired stays, and nothing will be undone. */
  commit(): void {
    this.steps = [];
  }

  /** Steps still armed, newest last (for tests and error messages). */
  get pending(): readonly string[] {
    return this.steps.map((s) => s.step);
  }

  /**
   * Undo every step, newest first, each one even if an earlier one threw. The
   * stack is empty afterwards; the failures come back in the order they happened.
   */
  async unwind(): Promise<UndoFailure[]> {
    const failures: UndoFailure[] = [];
    while (this.steps.length > 0) {
      const { step, undo } = this.steps.pop()!;
      try {
        await undo();
      } catch (error) {
        failures.push({ step, error });
      }
    }
    return failures;
  }

  /**
   * Give back everything, for teardown that runs on success too (a temporary VMM):
   * every step runs, and if any failed, one error names them all.
   */
  async unwindOrThrow(what: string): Promise<void> {
    const failures = await this.unwind();
    if (failures.length > 0) throw withTeardownFailures(new ForkdError("io_error", `${what} succeeded`), failures);
  }

  /**
   * Unwind after `err` and hand back the error to throw: `err` itself when the
   * teardown went clean; otherwise the same code with the teardown's failures named,
   * so a leak is reported instead of hidden behind the first failure.
   */
  async rollback(err: unknown): Promise<unknown> {
    const failures = await this.unwind();
    return withTeardownFailures(err, failures);
  }
}

/** `err`, or a copy naming what the teardown after it could not undo. */
export function withTeardownFailures(err: unknown, failures: readonly UndoFailure[]): unknown {
  if (failures.length === 0) return err;
  const named = failures.map((f) => `${f.step}: ${f.error instanceof Error ? f.error.message : String(f.error)}`);
  const note = `; the teardown after it also failed (${named.join("; ")})`;
  if (err instanceof ForkdError) {
    return new ForkdError(
      err.code,
      `${err.message}${note}`,
      { ...err.details, teardown_failed: failures.map((f) => f.step) },
      { cause: err },
    );
  }
  return new AggregateError([err, ...failures.map((f) => f.error)], `${err instanceof Error ? err.message : String(err)}${note}`, {
    cause: err,
  });
}
