// The public surface of @forkd/core (modules by path; layers in ARCHITECTURE.md): what the
// other packages (cli, daemon) import, named one by one so that a module's new
// export is not public until it is added here. npm run lint:unused (knip) reports an
// export here that nothing imports.

export { chooseAccel, Vm } from "./boot/vm.js";
export { startBranch } from "./branch/branch.js";
export { forkLiveAllOrNothing } from "./branch/fork-live.js";
export { forkdHome, forkdRunDir, shmDir } from "./common/config.js";
export { ensureRuntimeDir, ensureStateDir } from "./common/dirs.js";
export { ERROR_STATUS, type ErrorCode, ForkdError, isForkdError } from "./common/errors.js";
export { procStatFields } from "./common/pid.js";
export { pssBytes } from "./common/procmem.js";
export { configureSettings, defaultSocketPath, setting, settings, settingsEnv, withSettings } from "./common/settings.js";
export { validateName, validateSandboxId } from "./common/validate.js";
export { AgentCallError, AgentClient } from "./guest/agent-client.js";
export { forgetImageBuild, getImage, type ImageManifest, listImages } from "./guest/image.js";
export { checkGuestPayload, guestPayloadLimitBytes } from "./guest/payload-limit.js";
export { listRecipeNames, loadRecipe, parseRecipeSpec, type Recipe, recipeDigest } from "./guest/recipe-file.js";
export { packSnapshot, unpackFile } from "./hub/pack.js";
export { pullSnapshot, pullSource } from "./hub/pull.js";
export { type PullResult, pushSnapshot, pushTarget } from "./hub/registry.js";
export { egressPolicyEnabled, ensureEgressNamespace, markEgressPolicy } from "./net/netns.js";
export { cleanup } from "./ops/cleanup.js";
export { compactSnapshot } from "./ops/compact.js";
export { runDoctor } from "./ops/doctor.js";
export { buildImage, pruneImages } from "./ops/images.js";
export { findLeftovers } from "./ops/leftovers.js";
export { removeSnapshot } from "./ops/remove-snapshot.js";
export {
  type ApiChildTimings,
  type ApiSandbox,
  type ApiSnapshot,
  apiPendingSnapshotView,
  apiSandboxView,
  apiSnapshotView,
  branchesBySource,
  childTimingsView,
  claimedChildView,
  restoredChildView,
} from "./ops/views.js";
export {
  type ApiWorkspace,
  apiWorkspaceView,
  createWorkspace,
  deleteWorkspace,
  getWorkspace,
  listWorkspaces,
  resumeWorkspace,
  suspendWorkspace,
} from "./ops/workspaces.js";
export {
  type Claimed,
  checkPoolFits,
  claimPooled,
  drainPool,
  fillPool,
  listPools,
  type PoolView,
  poolCanServe,
  poolView,
  setPoolSize,
  validatePoolSize,
} from "./pool/pool.js";
export { AdmissionLedger } from "./sandbox/admission.js";
export { admissionLimits, admitBranch, admitFork, admitSnapshot, forkRoom, readCapacity } from "./sandbox/admission-host.js";
export { cgroupDirs } from "./sandbox/cgroup.js";
export { defaultRestoreConcurrency, type ForkChildResult, forkSandboxes, planRestore, validateForkCount } from "./sandbox/fork.js";
export { forkAllOrNothing } from "./sandbox/fork-policy.js";
export { connectSandbox, expireSandboxes, getSandbox, killSandbox, listSandboxes, watchAgentHealth } from "./sandbox/lifecycle.js";
export { physicalBytes, type SnapshotDetails, snapshotDetails, stageSnapshot } from "./store/chains.js";
export { poolSettings } from "./store/pools.js";
export { getSnapshot, listSnapshots } from "./store/snapshots.js";
export { sealedSource, stagedPath } from "./store/staging.js";
export { branches, staged } from "./store/state.js";
export { parseAccel } from "./vmm/accel.js";
export { type Accel, runtimePaths, validateResources } from "./vmm/plan.js";
export { killAndWait, launchQemu, makeRunDir, newSandboxId, removeRunDir } from "./vmm/process.js";
export { QmpClient } from "./vmm/qmp.js";
export { createSnapshot } from "./warm/create.js";

// Test-facing: core's pure logic (QEMU arguments, admission, egress rulesets, parsers...)
// that the unit tests check without booting VMs, and state the integration tests inspect.
// No other package imports these.

export { judgeGuestRam } from "./branch/live-capture.js";
export { deviceSplice, ramSectionId, spliceDevices } from "./branch/vmstate.js";
export { snapshotsDir, vmsRunDir } from "./common/config.js";
export { ensurePrivateDir, parentDirVerdict, privateDirVerdict } from "./common/dirs.js";
export { type FaultStep, faultPoint } from "./common/fault.js";
export { readVmmFile, writeVmmFile } from "./common/fsutil.js";
export { isAlive, withPidLock } from "./common/pid.js";
export { clientSocketPath, SETTINGS, settingsMarkdown } from "./common/settings.js";
export { UndoStack, withTeardownFailures } from "./common/undo.js";
export { waitForAgent } from "./guest/agent-wait.js";
export { compareKernelVersions, inTree, resolveModules, uuidFromDigest } from "./guest/image.js";
export { parseChallenges, registryCredentials } from "./hub/auth.js";
export { fetchFollowing } from "./hub/download.js";
export { validateHubIndex } from "./hub/hub-index.js";
export { checkRedirect } from "./hub/redirects.js";
export { parsePullSource, parseRegistryRef } from "./hub/reference.js";
export { validateOciManifest } from "./hub/registry.js";
export { unreachable } from "./hub/registry-client.js";
export { egressNamespaceInfo } from "./net/netns.js";
export {
  egressLayout,
  formatEgressEntry,
  parseEgressEntry,
  parseEgressPolicy,
  parseResolvConf,
  renderHostRuleset,
  renderNamespaceRuleset,
  renderSandboxRemoval,
  renderSandboxRules,
  uplinkSubnet,
} from "./net/policy.js";
export { isStrayTempName } from "./ops/cleanup.js";
export {
  branchNeeds,
  type Capacity,
  decide,
  defaultLimits,
  forkNeeds,
  liveForkNeeds,
  NO_NEEDS,
  parseMemInfo,
  refusalError,
  snapshotNeeds,
  VMM_OVERHEAD_BYTES,
} from "./sandbox/admission.js";
export { cpuSettings, detectCgroups, readCpuLimit, validateCpuLimit } from "./sandbox/cgroup.js";
export { allOrNothing } from "./sandbox/fork-policy.js";
export { offerCapture, useOfferedCapture } from "./sandbox/offered-captures.js";
export { priorityValues, setSandboxPriority } from "./sandbox/priority.js";
export { type SnapshotInfo, snapshotStateOf } from "./store/snapshots.js";
export { enforceStageBudget, evictableStagedBytes, evictStaged, holdStaged, inProgressStageBytes } from "./store/staging.js";
export { sandboxes } from "./store/state.js";
export {
  assertSandboxAllows,
  assertSnapshotAllows,
  assertWorkspaceAllows,
  claimableBranchStatuses,
  SANDBOX_OPS,
  SANDBOX_RULES,
  SANDBOX_STATES,
  SNAPSHOT_OPS,
  SNAPSHOT_RULES,
  SNAPSHOT_STATES,
  sandboxAllows,
  sandboxRowsAllowing,
  sandboxState,
  snapshotAllows,
  WORKSPACE_OPS,
  WORKSPACE_RULES,
  WORKSPACE_STATES,
  workspaceAllows,
  workspaceState,
} from "./store/state-rules.js";
export { accelFromHost } from "./vmm/accel.js";
export { capturePagesPath, findGuestRam } from "./vmm/capture-pages.js";
export { exposedPaths, hiddenPaths, launcherArgs, launcherPath, planConfinement, VMM_GID, VMM_UID_BASE } from "./vmm/confine.js";
export { buildQemuArgs, guestAppend, type VmPlan } from "./vmm/plan.js";
export { keepFromVmms, keepLogs, runDirUid } from "./vmm/process.js";
export { MAX_QMP_EVENTS_PER_SECOND, MAX_QMP_LINE_CHARS, type QmpEvent } from "./vmm/qmp.js";
