// The public surface of @forkd/cluster: what the daemon (and the tests) import. An
// export nothing imports is reported by knip; add one here when a caller needs it.
export { catalogDiff } from "./catalog.js";
export { type ClusterConfig, type ClusterHost, ClusterNode, clusterConfig, readClusterToken } from "./cluster.js";
export { keys, parseEtcdUrl } from "./etcd.js";
export {
  CLUSTER_TOKEN_HEADER,
  changesSandboxes,
  FORWARDED_HEADER,
  isNewWork,
  mergedListOf,
  planRequest,
  proxyRequest,
  sandboxIdOf,
} from "./forward.js";
export { type NodeRecord, type NodeStatus, type SnapshotPresence, validateAdvertiseUrl, validateNodeName } from "./membership.js";
export { type Locality, localityOf, type NodeOffer } from "./placement.js";
export { type Prepared, ShareRefused, type SpreadChild, type SpreadPeers, spreadFork } from "./spread.js";
export { tagCreatedBy } from "./tags.js";
