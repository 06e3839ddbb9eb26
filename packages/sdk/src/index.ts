export { Controller, type ControllerOpts, type ExecExit, ForkdApiError } from "./controller.js";
export {
  ALL_TRAFFIC,
  CommandExitError,
  CommandHandle,
  type CommandResult,
  type CommandRunOpts,
  type EntryInfo,
  Sandbox,
  type SandboxOpts,
} from "./sandbox.js";
