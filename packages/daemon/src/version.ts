/** The daemon and API version, reported by /version and in the OpenAPI document. */
export const FORKD_VERSION = "0.1.0";
