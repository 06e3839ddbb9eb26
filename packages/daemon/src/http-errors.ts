// How every failure leaves the daemon: core's one error table (ERROR_STATUS) gives
// the status of each ForkdError code; Fastify's own failures are mapped here.
import { ERROR_STATUS, type ErrorCode, isForkdError } from "@forkd/core";
import type { FastifyError } from "fastify";

/** Large enough for an 8 MiB file write (base64 grows it by a third), small enough to refuse abuse early. */
export const BODY_LIMIT_BYTES = 12 * 2 ** 20;

/**
 * One line per code saying what to do next: an agent reading the error can act on it.
 * Keyed by the closed ErrorCode union, so a code added to core's table without its line here does not compile.
 */
export const REMEDIATION: Record<ErrorCode, string> = {
  bad_request: "fix the field the message names and send the request again",
  invalid_tag: "use 1-64 characters of letters, digits, '_', '.' and '-', starting with a letter, digit or '_'",
  invalid_id: "list sandboxes with GET /v1/sandboxes (forkd ls) and use one of their ids",
  invalid_path: "send an absolute path inside the sandbox",
  unauthorized: "send Authorization: Bearer <token> (the daemon's token file, or FORKD_TOKEN), or use the unix socket",
  not_found: "check the path or name; GET /v1/openapi.json lists the routes",
  image_not_found: "build the image first: forkd image build --name NAME",
  snapshot_not_found: "list snapshots with GET /v1/snapshots (forkd images), or create one with POST /v1/snapshots",
  sandbox_not_found: "list sandboxes with GET /v1/sandboxes (forkd ls); a sandbox whose VMM exited is removed",
  conflict: "pick another name, or remove what holds it first (the message says what)",
  invalid_state: "wait until the resource is in a state that allows this, or kill and recreate the sandbox",
  too_large: "send less: split the file or the output, or raise the limit the message names",
  unsupported_media_type: "send JSON with Content-Type: application/json",
  validation_failed: "fix the fields the message names (unknown fields are refused) and send the request again",
  over_limit: "retry after Retry-After seconds, or free what the message says is short",
  missing_dependency: "install what the message names (npm run setup does it on Debian), then retry",
  not_supported: "this host cannot do that; forkd doctor says why and what would",
  vm_start_failed: "read the console log the message names; forkd doctor checks the host",
  vm_timeout: "retry with a longer timeout, or check the sandbox is not overloaded",
  agent_error: "the guest agent did not answer as expected; retry, or kill and recreate the sandbox",
  guest_error:
    "the guest refused the operation (the message gives its error); change the path or command, or free what it names in the sandbox",
  qmp_error: "the VMM refused the operation; retry, or kill and recreate the sandbox",
  io_error: "check disk space and permissions of forkd's directories (forkd doctor)",
  integrity_failed: "remove the damaged snapshot (forkd rmi TAG) and create or pull it again",
  unsafe_path: "fix the ownership or mode of the directory the message names",
  registry_unreachable:
    "check the registry's host name, network and TLS (the message names the host and what failed), then pull or push again",
  registry_denied:
    "log in to the registry (docker login HOST, or FORKD_REGISTRY_USERNAME and FORKD_REGISTRY_PASSWORD) with an account allowed to do this",
  invalid_setting:
    "set the environment variable the message names to a value it allows (README: Configuration), or unset it for the default, and restart",
  node_unreachable:
    "the node that runs this sandbox lost its cluster lease: restart or reconnect that node (`forkd cluster ls` shows it missing); its sandboxes answer again once it rejoins",
  cluster_unavailable:
    "check that etcd answers (etcdctl endpoint health) and that this node holds its lease (`forkd cluster ls`); retry once it has rejoined, or call another node",
  internal: "see the daemon's log; this is a bug in forkd",
};

/** forkd's error body ({"error": message}) with our code and next step beside it, never instead. */
export function errorBody(code: ErrorCode, message: string, details?: Record<string, unknown>) {
  return {
    error: message,
    code,
    remediation: REMEDIATION[code],
    ...(details && Object.keys(details).length ? { details } : {}),
  };
}

/** Fastify's own failures (parsing, limits, content types) mapped onto our codes. */
export function classify(err: FastifyError & { validation?: unknown }): {
  status: number;
  code: ErrorCode;
  message: string;
  details?: Record<string, unknown>;
} {
  if (isForkdError(err)) return { status: err.httpStatus, code: err.code, message: err.message, details: err.details };
  if (err.validation || err.code === "FST_ERR_VALIDATION") {
    return {
      status: ERROR_STATUS.validation_failed,
      code: "validation_failed",
      message: `request does not match the schema: ${err.message}`,
    };
  }
  switch (err.code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return { status: 413, code: "too_large", message: `request body is larger than ${BODY_LIMIT_BYTES} bytes` };
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return { status: 415, code: "unsupported_media_type", message: "send JSON with Content-Type: application/json" };
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
      return { status: 400, code: "bad_request", message: "the JSON body is empty" };
    case "FST_ERR_CTP_INVALID_JSON_BODY":
      return { status: 400, code: "bad_request", message: `the body is not valid JSON: ${err.message}` };
  }
  if (err instanceof SyntaxError || err.statusCode === 400)
    return { status: 400, code: "bad_request", message: `malformed request: ${err.message}` };
  if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500)
    return { status: err.statusCode, code: "bad_request", message: err.message };
  return { status: 500, code: "internal", message: "internal error; see the daemon log" };
}
