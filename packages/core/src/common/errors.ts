// One error type for every failure forkd reports, with a stable code. The HTTP
// status of each code lives in this one table so the daemon, CLI and SDK agree.

export const ERROR_STATUS = {
  bad_request: 400,
  invalid_tag: 400,
  invalid_id: 400,
  invalid_path: 400,
  unauthorized: 401,
  not_found: 404,
  image_not_found: 404,
  snapshot_not_found: 404,
  sandbox_not_found: 404,
  conflict: 409,
  invalid_state: 409,
  too_large: 413,
  unsupported_media_type: 415,
  validation_failed: 422,
  over_limit: 503,
  missing_dependency: 500,
  not_supported: 501,
  vm_start_failed: 500,
  vm_timeout: 504,
  agent_error: 502,
  qmp_error: 502,
  io_error: 500,
  /** One of forkd's directories is not private to it (owner, mode or a symlink). */
  unsafe_path: 500,
  /** A memory image does not match the digest recorded when its snapshot was registered, or a downloaded blob its digest. */
  integrity_failed: 500,
  /** A registry or hub that cannot be reached (unknown host, refused connection, TLS) or answers outside the protocol. */
  registry_unreachable: 502,
  /** The guest could not do what was asked (its filesystem or kernel refused: EIO, EBUSY, EACCES…): the request, not forkd, must change. */
  guest_error: 422,
  /** A registry that refuses the credentials forkd sent (or asks for some and none are configured). */
  registry_denied: 502,
  /** A setting (an environment variable, common/settings.ts) holds a value it does not allow: the host's configuration must change. */
  invalid_setting: 500,
  /** The cluster node that owns the sandbox holds no lease in etcd (stopped, cut off, or crashed): its calls cannot be forwarded. */
  node_unreachable: 503,
  /** etcd cannot be reached, or this node lost its lease and has not rejoined: nothing cluster-wide (placement, a new tag) is done. */
  cluster_unavailable: 503,
  internal: 500,
} as const;

/** The closed set of codes: a code is added to ERROR_STATUS (with its status) or it does not exist. */
export type ErrorCode = keyof typeof ERROR_STATUS;

/** A code that came over the wire (an API answer) is one of ours only if the table has it as its own key. */
export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === "string" && Object.hasOwn(ERROR_STATUS, value);
}

export class ForkdError extends Error {
  override readonly name = "ForkdError";
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details: Record<string, unknown> = {},
    opts?: { cause?: unknown },
  ) {
    super(message, opts);
  }

  get httpStatus(): number {
    return ERROR_STATUS[this.code];
  }

  toJSON() {
    return { code: this.code, message: this.message, ...(Object.keys(this.details).length ? { details: this.details } : {}) };
  }
}

export function isForkdError(err: unknown, code?: ErrorCode): err is ForkdError {
  return err instanceof ForkdError && (code === undefined || err.code === code);
}
