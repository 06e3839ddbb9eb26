/**
 * The envdVersion forkd claims: the highest whose features the SDK gates on are all
 * served here (stdin control 0.3.0, default user 0.4.0, closeStdin 0.5.2,
 * octet-stream upload 0.5.7). 0.6.2 adds file metadata (X-Metadata-* kept as
 * extended attributes), which is not served, so watch entries (0.6.3) and network
 * mounts (0.6.4), though served, stay behind the SDK's version gate.
 */
export const ENVD_VERSION = "0.6.1";
