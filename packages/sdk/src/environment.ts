// The SDK's one reader of the environment. forkd's host packages take their
// settings from @forkd/core's table (common/settings.ts), which a client library
// must not pull in (SQLite, QEMU): the SDK's functions take the variables as an
// argument (FORKD_URL, FORKD_TOKEN, FORKD_SOCKET, FORKD_RUN_DIR, FORKD_HOME,
// documented in forkd's README) and default to this process's. The CLI passes its
// settings in instead.
export function processEnvironment(): NodeJS.ProcessEnv {
  return process.env;
}
