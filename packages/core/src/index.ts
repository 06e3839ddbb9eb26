// The public surface of @forkd/core, layer by layer (ARCHITECTURE.md).

export * from "./boot/vm.js";
export * from "./branch/branch.js";
export * from "./common/config.js";
export * from "./common/dirs.js";
export * from "./common/errors.js";
export * from "./common/procmem.js";
export * from "./common/validate.js";
export * from "./guest/agent-client.js";
export * from "./guest/agent-wait.js";
export * from "./guest/image.js";
export * from "./ops/cleanup.js";
export * from "./ops/doctor.js";
export * from "./ops/images.js";
export * from "./ops/remove-snapshot.js";
export * from "./ops/views.js";
export * from "./sandbox/cgroup.js";
export * from "./sandbox/fork.js";
export * from "./sandbox/lifecycle.js";
export * from "./store/snapshots.js";
export * from "./store/staging.js";
export * from "./store/state.js";
export * from "./vmm/accel.js";
export * from "./vmm/plan.js";
export * from "./vmm/process.js";
export * from "./vmm/qmp.js";
export * from "./warm/create.js";
