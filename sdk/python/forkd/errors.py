"""Errors raised by the forkd SDK.

Every error is a :class:`ControllerError` (a ``RuntimeError``, as in forkd's
own SDK), so ``except ControllerError`` keeps catching everything. The
subclasses say what kind of failure it was; ``.code`` is the daemon's stable
error code (``sandbox_not_found``, ``invalid_tag``, ``over_limit``, ...) and
``.remediation`` its one-line hint on what to do next.

Two errors come from the client side rather than from an HTTP answer, and
therefore have ``status`` None:

* :class:`ConnectionError` -- the daemon could not be reached. It is a
  ``ControllerError`` *and* Python's built-in ``ConnectionError`` (so an
  ``OSError``): ``except forkd.ControllerError``, ``except ConnectionError``
  and ``except OSError`` all catch it. Its message names the URL or unix
  socket that was tried.
* :class:`TimeoutError` -- no answer within the client's timeout (also raised
  for the daemon's own 504 ``vm_timeout``). It is also Python's built-in
  ``TimeoutError``.
"""

from __future__ import annotations

import builtins
import json
from typing import Any, Dict, Optional, Type

__all__ = [
    "ControllerError",
    "BadRequestError",
    "AuthError",
    "NotFoundError",
    "ConflictError",
    "OverLimitError",
    "NotSupportedError",
    "AgentError",
    "ServerError",
    "TimeoutError",
    "ConnectionError",
    "error_from_response",
]


def _snippet(body: Any) -> str:
    if isinstance(body, str):
        return body
    try:
        return json.dumps(body)
    except (TypeError, ValueError):
        return repr(body)


class ControllerError(RuntimeError):
    """A request the daemon refused or failed (any non-2xx answer).

    Attributes, as in forkd's SDK:

    * ``status`` -- the HTTP status (None when no answer came at all)
    * ``body`` -- the parsed JSON error body, else its text (``{}`` when empty)
    * ``url`` -- the URL requested (``unix:/path/forkd.sock/v1/...`` over a socket)

    and ours:

    * ``code`` -- the daemon's stable error code (``"http_<status>"`` when the body has none)
    * ``remediation`` -- the daemon's hint on what to do next, or None
    * ``details`` -- extra structured details, or None

    ``str(err)`` is ``controller <url>: HTTP <status>: <body>``.
    """

    #: ``code`` when no HTTP answer came (overridden by the client-side errors).
    _client_code = "http_error"

    def __init__(self, status: Optional[int], body: Any, url: str, message: Optional[str] = None) -> None:
        self.status = status
        self.body = body
        self.url = url
        self.code: str = self._client_code
        self.remediation: Optional[str] = None
        self.details: Optional[Dict[str, Any]] = None
        self.error_message: str = body if isinstance(body, str) else ""
        self._read_body(body)
        if message is None:
            message = f"controller {url}: HTTP {status}: {_snippet(body)}"
        super().__init__(message)

    def _read_body(self, body: Any) -> None:
        if self.status is not None:
            self.code = f"http_{self.status}"
        if not isinstance(body, dict):
            return
        err = body.get("error")
        if isinstance(err, dict):
            # An older forkd-ts daemon: {"error": {"code", "message", "details"}}.
            code, message, remediation, details = err.get("code"), err.get("message"), err.get("remediation"), err.get("details")
        else:
            # forkd's shape, with our extras: {"error": msg, "code", "remediation", "details"}.
            code, message, remediation, details = body.get("code"), err, body.get("remediation"), body.get("details")
        if isinstance(code, str) and code:
            self.code = code
        if isinstance(message, str):
            self.error_message = message
        if isinstance(remediation, str) and remediation:
            self.remediation = remediation
        if isinstance(details, dict):
            self.details = details


class BadRequestError(ControllerError):
    """400, 413, 415 or 422: the request itself is wrong (a bad tag, a value out of range, an unknown field)."""


class AuthError(ControllerError):
    """401 or 403: no token, or the wrong one (set ``FORKD_TOKEN`` or pass ``token=``)."""


class NotFoundError(ControllerError):
    """404: no such snapshot, sandbox, workspace, job or file."""


class ConflictError(ControllerError):
    """409: the tag already exists, the sandbox is unhealthy, a BRANCH to that tag is in progress, ..."""


class OverLimitError(ControllerError):
    """503: the daemon is at a limit (sandboxes, BRANCHes in flight, staging budget); retry later."""


class NotSupportedError(ControllerError):
    """501: this daemon or host cannot do that."""


class AgentError(ControllerError):
    """502: the guest agent (or QEMU) failed or answered outside the protocol."""


class ServerError(ControllerError):
    """500 and any other 5xx the other classes do not cover."""


class TimeoutError(ControllerError, builtins.TimeoutError):  # noqa: A001 - forkd.TimeoutError on purpose
    """No answer in time: the client's own timeout, or the daemon's 504 ``vm_timeout``.

    Also Python's built-in ``TimeoutError`` (an ``OSError``). ``code`` is the
    daemon's (``vm_timeout``), or ``"timeout"`` when the client gave up waiting.
    """

    _client_code = "timeout"


class ConnectionError(ControllerError, builtins.ConnectionError):  # noqa: A001 - forkd.ConnectionError on purpose
    """The daemon could not be reached (not running, wrong URL or socket, connection dropped).

    A ``ControllerError`` with ``status`` None and ``code`` ``"unreachable"``, and
    also Python's built-in ``ConnectionError`` (an ``OSError``). ``url`` is the
    URL or ``unix:<socket>`` that was tried; the message names it.
    """

    _client_code = "unreachable"


_BY_STATUS: Dict[int, Type[ControllerError]] = {
    400: BadRequestError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    415: BadRequestError,
    422: BadRequestError,
    501: NotSupportedError,
    502: AgentError,
    503: OverLimitError,
    504: TimeoutError,
}


def error_from_response(status: int, body: Any, url: str) -> ControllerError:
    """The typed error for a non-2xx answer."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ControllerError
    return cls(status, body, url)
