"""forkd -- Python SDK for the forkd microVM sandbox daemon (forkd-ts).

Two surfaces, standard library only:

- ``Controller`` -- the daemon's REST API, with forkd v0.5.3's method names and
  request bodies (``spawn_sandboxes``, ``branch_sandbox``, ``exec_command``, ...)
  plus forkd-ts's extras (``create_snapshot``, files, workspaces, jobs, ...).
- ``Sandbox`` -- an E2B-shaped sandbox over the daemon: ``Sandbox.create``,
  ``commands.run``, ``files``, ``run_code``, ``branch``, ``kill``.

The daemon is found through ``base_url``, ``$FORKD_URL`` (``http://host:port``
or ``unix:/path/to/forkd.sock``), the local socket ``$FORKD_RUN_DIR/forkd.sock``,
or ``http://127.0.0.1:8889``; the token comes from ``token`` or ``$FORKD_TOKEN``.
"""

from ._transport import InsecureTokenFileError
from ._version import __version__
from .controller import BranchMode, Controller, SnapshotFailedError
from .errors import (
    AgentError,
    AuthError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    ControllerError,
    NotFoundError,
    NotSupportedError,
    OverLimitError,
    ServerError,
    TimeoutError,
)
from .sandbox import (
    ALL_TRAFFIC,
    CommandHandle,
    CommandResult,
    EntryInfo,
    Execution,
    ExecutionError,
    Logs,
    Result,
    Sandbox,
    WriteInfo,
)

__all__ = [
    "__version__",
    "ALL_TRAFFIC",
    "AgentError",
    "AuthError",
    "BadRequestError",
    "BranchMode",
    "CommandHandle",
    "CommandResult",
    "ConflictError",
    "ConnectionError",
    "Controller",
    "ControllerError",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "InsecureTokenFileError",
    "Logs",
    "NotFoundError",
    "NotSupportedError",
    "OverLimitError",
    "Result",
    "Sandbox",
    "ServerError",
    "SnapshotFailedError",
    "TimeoutError",
    "WriteInfo",
]
