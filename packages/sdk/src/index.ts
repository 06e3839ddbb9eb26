export { Controller, type ControllerOpts, type ExecExit, ForkdApiError } from "./controller.js";
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
