/** The envd version forkd claims: the highest whose features the envd plane all implements (the SDK gates features on it). */
export const ENVD_VERSION = "0.2.0";
