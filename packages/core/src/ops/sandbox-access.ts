// What the CLI's short commands need without a daemon (ls, exec, eval, files, ping,
// kill): the sandbox rows and an agent connection, without the rest of core. Loading
// core's index (every concept: images, hub, branch, pools) was most of `forkd ls`'s
// start-up; this entry loads the store, the lifecycle and the agent client.
export { connectSandbox, getSandbox, killSandbox, listSandboxes } from "../sandbox/lifecycle.js";
export { apiSandboxView, branchesBySource } from "./views.js";
