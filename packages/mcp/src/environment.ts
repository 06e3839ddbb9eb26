// The MCP server's one reader of the environment: its functions take the
// variables as an argument (FORKD_URL, FORKD_TOKEN, FORKD_SOCKET, FORKD_RUN_DIR,
// FORKD_HOME, FORKD_HTTP_TIMEOUT, documented in forkd's README) and default to this
// process's. @forkd/mcp imports only the SDK, not core's settings table; `forkd mcp`
// passes the CLI's settings in explicitly.
export function processEnvironment(): NodeJS.ProcessEnv {
  return process.env;
}
