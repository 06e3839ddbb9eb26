export { errorFromBody, ForkdApiError } from "./api-error.js";
export { type CallOpts, Controller, type ControllerOpts, type ExecExit } from "./controller.js";
export {
  ALL_TRAFFIC,
  type CommandConnectOpts,
  CommandExitError,
  CommandHandle,
  type CommandResult,
  type CommandRunOpts,
  type EntryInfo,
  type ProcessInfo,
  Sandbox,
  type SandboxOpts,
} from "./sandbox.js";
export { type DaemonTarget, DEFAULT_URL, isLoopbackUrl, resolveTarget } from "./target.js";
