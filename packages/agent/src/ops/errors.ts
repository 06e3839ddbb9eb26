import type { AgentErrorCode } from "../protocol.js";

export class AgentOpError extends Error {
  constructor(
    readonly code: AgentErrorCode,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }
}

/** Map a Node fs error onto the protocol's codes, naming the path involved. */
export function fsError(err: unknown, path: string): AgentOpError {
  const code = (err as NodeJS.ErrnoException).code;
  const message = (err as Error).message;
  switch (code) {
    case "ENOENT":
      return new AgentOpError("not_found", `no such file or directory: ${path}`);
    case "EEXIST":
      return new AgentOpError("exists", `already exists: ${path}`);
    case "ENOTDIR":
      return new AgentOpError("not_a_directory", `not a directory: ${path}`);
    case "EISDIR":
      return new AgentOpError("is_a_directory", `is a directory: ${path}`);
    case "EACCES":
    case "EPERM":
      return new AgentOpError("permission_denied", `permission denied: ${path}`);
    default:
      return new AgentOpError("io_error", `${path}: ${message}`);
  }
}

export function requireString(value: unknown, name: string): string {
  if (typeof value !== "string" || value.length === 0) {
    throw new AgentOpError("bad_request", `\`${name}\` must be a non-empty string`);
  }
  return value;
}
