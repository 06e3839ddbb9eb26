"""Client for the forkd daemon's REST API v1.

``Controller`` keeps forkd v0.5.3's Python method names, arguments and request
bodies (``list_snapshots``, ``spawn_sandboxes``, ``branch_sandbox``,
``exec_command``, ...) and adds forkd-ts's extras under their own names
(``create_snapshot``, ``snapshot_status``, ``read_file``, workspaces, jobs, ...).

Where the daemon is, in order: the ``base_url`` argument, ``$FORKD_URL``, the
local unix socket ``$FORKD_RUN_DIR/forkd.sock`` (``/run/forkd/forkd.sock``) if
it exists, else ``http://127.0.0.1:8889``. A URL is ``http://host:port``,
``https://host:port`` or ``unix:/path/to/forkd.sock``. The token is the
``token`` argument, else ``$FORKD_TOKEN``; it is sent only over TCP, since the
socket's file permissions are its credential.

>>> from forkd import Controller
>>> c = Controller()
>>> [child] = c.spawn_sandboxes("my-warm-tag")
>>> c.exec_command(child["id"], ["uname", "-a"])["stdout"]
'Linux ...'
>>> branch = c.branch_sandbox(child["id"], mode="live")
>>> grandchildren = c.spawn_sandboxes(branch["tag"], n=5)
"""

from __future__ import annotations

import base64
import builtins
import http.client
import json
import os
import socket
import ssl
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, cast
from urllib.parse import quote, urlencode

from . import _transport
from ._version import __version__
from .errors import ConnectionError, ControllerError, TimeoutError, error_from_response

__all__ = ["Controller", "BranchMode", "SnapshotFailedError"]

try:  # Python 3.8+ has Literal; kept as a plain alias for type checkers.
    from typing import Literal

    BranchMode = Literal["full", "diff", "live"]
except ImportError:  # pragma: no cover
    BranchMode = str  # type: ignore[misc]

_NO_BODY = object()

#: One JSON object from the daemon, as ``json`` parses it.
JsonObject = Dict[str, Any]

#: Seconds allowed for calls that boot or capture VMs (snapshot, fork, BRANCH), at least.
LONG_CALL_TIMEOUT = 900.0


class SnapshotFailedError(ControllerError):
    """A snapshot (a BRANCH written in the background) ended in ``status: "failed"``."""


def _seg(value: Any) -> str:
    """One URL path segment, percent-encoded (``/`` included)."""
    return quote(str(value), safe="")


class Controller:
    """Client for the forkd daemon's REST API.

    Parameters
    ----------
    base_url:
        ``http://host:port``, ``https://host:port`` or ``unix:/path/to/forkd.sock``.
        Defaults to ``$FORKD_URL``, then the local socket if it exists, then
        ``http://127.0.0.1:8889``.
    token:
        Bearer token for TCP. Defaults to ``$FORKD_TOKEN``; for a daemon on this
        host's loopback, then to the daemon's own token file ``$FORKD_HOME/token``
        if this user can read it. Not needed (and not sent) over the unix socket.
    timeout:
        Seconds to wait for an answer. Calls that boot or capture VMs (snapshot,
        spawn, BRANCH, workspace suspend/resume) wait at least 900 s, and exec
        waits its own ``timeout_secs`` on top. None waits forever.
    ssl_context:
        For ``https://`` daemons with a certificate the system does not trust.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = 60.0,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self._endpoint = _transport.resolve_endpoint(base_url)
        self.base_url: str = self._endpoint.base_url
        self.token: Optional[str] = token if token is not None else os.environ.get("FORKD_TOKEN")
        if self.token is None and not self._endpoint.is_unix and _transport.is_loopback(self._endpoint.host):
            # The daemon's own token file is this host's secret: only ever sent to a daemon on this host.
            self.token = _transport.local_token()
        self.timeout = timeout
        self._ssl_context = ssl_context

    def __repr__(self) -> str:  # never the token
        return f"Controller(base_url={self.base_url!r})"

    @property
    def is_unix_socket(self) -> bool:
        """True when this client talks to the daemon over its unix socket."""
        return self._endpoint.is_unix

    # --- service ------------------------------------------------------

    def health(self) -> JsonObject:
        """``GET /healthz`` -- ``{"ok": true}``; needs no token."""
        return self._object("GET", "/healthz")

    def version(self) -> JsonObject:
        """``GET /version`` -- ``{"version", "api": "v1", ...}``."""
        return self._object("GET", "/version")

    def metrics(self) -> str:
        """``GET /metrics`` -- Prometheus text."""
        return self._text("GET", "/metrics")

    # --- snapshots (forkd) --------------------------------------------

    def list_snapshots(self) -> List[JsonObject]:
        """``GET /v1/snapshots`` -- every snapshot; BRANCHes still being written come last with ``status: "writing"``."""
        return self._objects("GET", "/v1/snapshots")

    def delete_snapshot(self, tag: str, *, cascade: bool = False, force: bool = False) -> None:
        """``DELETE /v1/snapshots/:tag``.

        ``cascade`` (ours and forkd's) also deletes the snapshots stored as layers on it;
        ``force`` (ours) also kills the sandboxes running from it.
        """
        query = {}
        if cascade:
            query["cascade"] = "true"
        if force:
            query["force"] = "true"
        self._request("DELETE", f"/v1/snapshots/{_seg(tag)}", query=query)

    # --- snapshots (forkd-ts extras) ----------------------------------

    def create_snapshot(
        self,
        tag: str,
        image: str = "base",
        warm: Optional[Sequence[str]] = None,
        warm_eval: Optional[Sequence[str]] = None,
        memory_mib: Optional[int] = None,
        vcpus: Optional[int] = None,
    ) -> JsonObject:
        """``POST /v1/snapshots`` -- boot ``image``, run the ``warm`` shell commands and
        ``warm_eval`` code in it, and keep it as a warm snapshot ``tag`` (201 SnapshotInfo)."""
        body: Dict[str, Any] = {"tag": tag, "image": image}
        if warm is not None:
            body["warm"] = list(warm)
        if warm_eval is not None:
            body["warm_eval"] = list(warm_eval)
        if memory_mib is not None:
            body["memory_mib"] = memory_mib
        if vcpus is not None:
            body["vcpus"] = vcpus
        return self._object("POST", "/v1/snapshots", body, timeout=self._long())

    def get_snapshot(self, tag: str) -> JsonObject:
        """``GET /v1/snapshots/:tag`` -- one SnapshotInfo."""
        return self._object("GET", f"/v1/snapshots/{_seg(tag)}")

    def snapshot_info(self, tag: str) -> JsonObject:
        """``GET /v1/snapshots/:tag/info`` -- chain depth, ancestors, dependents, sizes and layers."""
        return self._object("GET", f"/v1/snapshots/{_seg(tag)}/info")

    def compact_snapshot(self, tag: str, to: str) -> JsonObject:
        """``POST /v1/snapshots/:tag/compact`` -- a standalone copy of a layered snapshot under ``to``."""
        return self._object("POST", f"/v1/snapshots/{_seg(tag)}/compact", {"to": to}, timeout=self._long())

    def snapshot_status(self, tag: str) -> JsonObject:
        """``GET /v1/snapshots/:tag/status`` -- ``ready``, ``writing`` (a BRANCH in progress) or ``failed``."""
        return self._object("GET", f"/v1/snapshots/{_seg(tag)}/status")

    def wait_for_snapshot(self, tag: str, timeout: Optional[float] = 600.0, interval: float = 0.1) -> JsonObject:
        """Poll :meth:`snapshot_status` until the snapshot is ``ready`` and return that status.

        Raises :class:`SnapshotFailedError` if it failed, :class:`forkd.TimeoutError`
        if it is still writing after ``timeout`` seconds (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.snapshot_status(tag)
            state = status.get("status")
            if state == "ready":
                return status
            if state == "failed":
                url = self._url(f"/v1/snapshots/{_seg(tag)}/status")
                reason = status.get("error") or status.get("warning") or "unknown"
                raise SnapshotFailedError(None, status, url, message=f"snapshot {tag} failed: {reason}")
            if deadline is not None and time.monotonic() >= deadline:
                url = self._url(f"/v1/snapshots/{_seg(tag)}/status")
                raise TimeoutError(None, status, url, message=f"snapshot {tag} was still {state} after {timeout} s")
            time.sleep(interval)

    # --- sandboxes (forkd) --------------------------------------------

    def spawn_sandboxes(
        self,
        snapshot_tag: str,
        n: int = 1,
        per_child_netns: bool = False,
        memory_limit_mib: Optional[int] = None,
        prewarm: bool = False,
        live_fork: bool = False,
        hugepages: bool = False,
        *,
        network: Optional[bool] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        cpu_limit: Optional[float] = None,
        timeout_ms: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> List[JsonObject]:
        """``POST /v1/sandboxes`` -- fork ``n`` children of a snapshot; returns their SandboxInfo dicts.

        The positional arguments and the body they make are forkd's. The keyword-only
        extras are forkd-ts's: ``network=False`` (no network at all), ``allow_out`` /
        ``deny_out`` (egress exceptions: IP, CIDR, IP:PORT), ``cpu_limit`` (CPUs, e.g.
        0.5), ``timeout_ms`` (kill each child this long after it starts) and
        ``metadata`` (string pairs shown on the sandbox).
        """
        body: Dict[str, Any] = {"snapshot_tag": snapshot_tag, "n": n, "per_child_netns": per_child_netns}
        if memory_limit_mib is not None:
            body["memory_limit_mib"] = memory_limit_mib
        if prewarm:
            body["prewarm"] = True
        if live_fork:
            body["live_fork"] = True
        if hugepages:
            body["hugepages"] = True
        if network is not None:
            body["network"] = network
        if allow_out:
            body["allow_out"] = list(allow_out)
        if deny_out:
            body["deny_out"] = list(deny_out)
        if cpu_limit is not None:
            body["cpu_limit"] = cpu_limit
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return self._objects("POST", "/v1/sandboxes", body, timeout=self._long())

    def list_sandboxes(self) -> List[JsonObject]:
        """``GET /v1/sandboxes`` -- every live sandbox."""
        return self._objects("GET", "/v1/sandboxes")

    def get_sandbox(self, sandbox_id: str) -> JsonObject:
        """``GET /v1/sandboxes/:id``."""
        return self._object("GET", f"/v1/sandboxes/{_seg(sandbox_id)}")

    def kill_sandbox(self, sandbox_id: str) -> None:
        """``DELETE /v1/sandboxes/:id``."""
        self._request("DELETE", f"/v1/sandboxes/{_seg(sandbox_id)}")

    def branch_sandbox(
        self,
        sandbox_id: str,
        tag: Optional[str] = None,
        diff: bool = False,
        measure_diff: bool = False,
        mode: Optional[str] = None,
        wait: bool = True,
    ) -> JsonObject:
        """``POST /v1/sandboxes/:id/branch`` -- pause, capture, resume: a new snapshot to spawn from.

        ``mode`` is ``"full"``, ``"diff"`` or ``"live"`` (``diff=True`` is forkd's legacy
        spelling of ``mode="diff"``). With ``wait=False`` the daemon answers (202) as
        soon as the source runs again, with ``status: "writing"``; poll
        :meth:`wait_for_snapshot` before spawning from it. Returns a SnapshotInfo dict.
        """
        body: Dict[str, Any] = {}
        if tag is not None:
            body["tag"] = tag
        if mode is not None:
            body["mode"] = mode
        elif diff:
            body["diff"] = True
        if measure_diff:
            body["measure_diff"] = True
        if not wait:
            body["wait"] = False
        return self._object("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/branch", body, timeout=self._long())

    def exec_command(
        self,
        sandbox_id: str,
        args: Union[Sequence[str], str],
        timeout_secs: int = 30,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Union[str, bytes]] = None,
    ) -> JsonObject:
        """``POST /v1/sandboxes/:id/exec`` -- run a command; returns ``{stdout, stderr, exit_code, ...}``.

        ``args`` is an argv list (forkd: no shell). forkd-ts extras: a ``str`` runs
        through ``/bin/sh -c`` (sent as ``cmd``), and ``env``, ``cwd`` and ``stdin``
        are passed on; the answer also has ``signal``, ``timed_out``, ``duration_ms``
        and ``truncated``.
        """
        body = _exec_body(args, env, cwd, stdin)
        body["timeout_secs"] = timeout_secs
        timeout = None if self.timeout is None else self.timeout + float(timeout_secs)
        return self._object("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/exec", body, timeout=timeout)

    def eval_code(self, sandbox_id: str, code: str, *, language: Optional[str] = None, timeout_ms: Optional[int] = None) -> JsonObject:
        """``POST /v1/sandboxes/:id/eval`` -- evaluate ``code`` in the sandbox's warm runtime.

        Returns ``{result, error, exit_code, ...}`` (``result`` is a string: Python's
        ``repr``, JavaScript's printed value; forkd-ts adds ``value``, the JSON value).
        ``language`` ("python" or "javascript") defaults to the image's runtime.
        """
        body: Dict[str, Any] = {"code": code}
        if language is not None:
            body["language"] = language
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        timeout = None if self.timeout is None else self.timeout + (timeout_ms or 30_000) / 1000.0
        return self._object("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/eval", body, timeout=timeout)

    def ping_sandbox(self, sandbox_id: str) -> JsonObject:
        """``POST /v1/sandboxes/:id/ping`` -- a round trip to the guest agent (``{"pong": true, ...}``)."""
        return self._object("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/ping")

    # --- sandboxes (forkd-ts extras) ----------------------------------

    def exec_stream(
        self,
        sandbox_id: str,
        args: Union[Sequence[str], str],
        *,
        on_stdout: Optional[Callable[[bytes], None]] = None,
        on_stderr: Optional[Callable[[bytes], None]] = None,
        timeout_ms: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Union[str, bytes]] = None,
        on_connection: Optional[Callable[[http.client.HTTPConnection], None]] = None,
    ) -> JsonObject:
        """``POST /v1/sandboxes/:id/exec/stream`` -- run a command, handing its output to the
        callbacks as it comes; returns the exit line ``{exit_code, signal, timed_out, duration_ms, ...}``.

        Closing the connection cancels the command in the guest: ``on_connection``
        receives it as soon as it is open (``Sandbox.commands.run(background=True)``
        uses this for ``kill()``).
        """
        body = _exec_body(args, env, cwd, stdin)
        if timeout_ms is not None:
            body["timeout_ms"] = timeout_ms
        # Between two chunks a quiet command may take its whole time limit.
        timeout = None if (self.timeout is None or timeout_ms is None) else self.timeout + timeout_ms / 1000.0
        path = f"/v1/sandboxes/{_seg(sandbox_id)}/exec/stream"
        exit_line: Optional[JsonObject] = None
        for event in self._ndjson("POST", path, body, timeout=timeout, on_connection=on_connection):
            kind = event.get("type")
            if kind == "stdout" and on_stdout is not None:
                on_stdout(base64.b64decode(event.get("data") or ""))
            elif kind == "stderr" and on_stderr is not None:
                on_stderr(base64.b64decode(event.get("data") or ""))
            elif kind == "exit":
                exit_line = event
            elif kind == "error":
                err = event.get("error")
                code, message = (err.get("code"), err.get("message")) if isinstance(err, dict) else (event.get("code"), err)
                raise error_from_response(502, {"error": message or "exec failed", "code": code or "agent_error"}, self._url(path))
        if exit_line is None:
            raise error_from_response(
                502, {"error": "the exec stream ended without an exit status", "code": "agent_error"}, self._url(path)
            )
        return exit_line

    # --- files (forkd-ts extras) --------------------------------------

    def files(self, sandbox_id: str, action: str, path: str, **fields: Any) -> JsonObject:
        """``POST /v1/sandboxes/:id/files`` with ``{action, path, ...}`` (read, write, list, stat, mkdir, remove)."""
        body: Dict[str, Any] = {"action": action, "path": path}
        body.update(fields)
        return self._object("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/files", body)

    def read_file(self, sandbox_id: str, path: str) -> bytes:
        """A file's bytes (up to the agent's per-call limit)."""
        res = self.files(sandbox_id, "read", path)
        data = res.get("data") or ""
        if res.get("encoding", "base64") == "base64":
            return base64.b64decode(data)
        return data.encode("utf-8")

    def write_file(self, sandbox_id: str, path: str, data: Union[str, bytes], mode: Optional[int] = None) -> JsonObject:
        """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``{path, size}``."""
        fields: Dict[str, Any]
        if isinstance(data, str):
            fields = {"data": data, "encoding": "utf8"}
        else:
            fields = {"data": base64.b64encode(bytes(data)).decode("ascii"), "encoding": "base64"}
        if mode is not None:
            fields["mode"] = mode
        return self.files(sandbox_id, "write", path, **fields)

    def list_files(self, sandbox_id: str, path: str) -> List[JsonObject]:
        """The entries of a directory: ``{name, type, size, mode, mtimeMs}`` each."""
        return list(self.files(sandbox_id, "list", path).get("entries") or [])

    def stat_file(self, sandbox_id: str, path: str) -> JsonObject:
        """``{path, type, size, mode, mtimeMs}`` of one path; :class:`NotFoundError` if absent."""
        return self.files(sandbox_id, "stat", path)

    def make_dir(self, sandbox_id: str, path: str) -> JsonObject:
        """``mkdir -p``."""
        return self.files(sandbox_id, "mkdir", path)

    def remove_file(self, sandbox_id: str, path: str, recursive: bool = False) -> JsonObject:
        """Remove a file, or a directory tree with ``recursive``."""
        return self.files(sandbox_id, "remove", path, recursive=recursive)

    # --- workspaces (forkd's, not in its SDKs) -------------------------

    def list_workspaces(self) -> List[JsonObject]:
        """``GET /v1/workspaces``."""
        return self._objects("GET", "/v1/workspaces")

    def create_workspace(
        self, name: str, snapshot_tag: str, per_child_netns: bool = False, memory_limit_mib: Optional[int] = None
    ) -> JsonObject:
        """``POST /v1/workspaces`` -- a named, long-lived sandbox that can be suspended and resumed."""
        body: Dict[str, Any] = {"name": name, "snapshot_tag": snapshot_tag, "per_child_netns": per_child_netns}
        if memory_limit_mib is not None:
            body["memory_limit_mib"] = memory_limit_mib
        return self._object("POST", "/v1/workspaces", body, timeout=self._long())

    def get_workspace(self, name: str) -> JsonObject:
        """``GET /v1/workspaces/:name``."""
        return self._object("GET", f"/v1/workspaces/{_seg(name)}")

    def delete_workspace(self, name: str) -> None:
        """``DELETE /v1/workspaces/:name`` -- kills its sandbox and removes its saved state."""
        self._request("DELETE", f"/v1/workspaces/{_seg(name)}")

    def suspend_workspace(self, name: str, diff: bool = False) -> JsonObject:
        """``POST /v1/workspaces/:name/suspend`` -- save its sandbox to disk and stop it."""
        return self._object("POST", f"/v1/workspaces/{_seg(name)}/suspend", {"diff": diff}, timeout=self._long())

    def resume_workspace(self, name: str) -> JsonObject:
        """``POST /v1/workspaces/:name/resume`` -- start a sandbox from its saved state."""
        return self._object("POST", f"/v1/workspaces/{_seg(name)}/resume", {}, timeout=self._long())

    # --- jobs: pack, unpack, push, pull (forkd-ts extras) ---------------

    def pack_snapshot(self, tag: str, path: str) -> JsonObject:
        """``POST /v1/snapshots/:tag/pack`` -- write a snapshot and what it needs into one file on the daemon's host (a job)."""
        return self._object("POST", f"/v1/snapshots/{_seg(tag)}/pack", {"path": path})

    def unpack_snapshot(self, path: str, tag: Optional[str] = None) -> JsonObject:
        """``POST /v1/snapshots/unpack`` -- verify and register a pack file on the daemon's host (a job)."""
        body: Dict[str, Any] = {"path": path}
        if tag is not None:
            body["tag"] = tag
        return self._object("POST", "/v1/snapshots/unpack", body)

    def push_snapshot(self, tag: str, ref: str) -> JsonObject:
        """``POST /v1/snapshots/:tag/push`` -- push to an OCI registry, ``HOST/REPO:TAG`` (a job)."""
        return self._object("POST", f"/v1/snapshots/{_seg(tag)}/push", {"ref": ref})

    def pull_snapshot(self, ref: str, tag: Optional[str] = None, hub: Optional[str] = None) -> JsonObject:
        """``POST /v1/snapshots/pull`` -- pull a registry reference, hub name or pack URL (a job)."""
        body: Dict[str, Any] = {"ref": ref}
        if tag is not None:
            body["tag"] = tag
        if hub is not None:
            body["hub"] = hub
        return self._object("POST", "/v1/snapshots/pull", body)

    def get_job(self, job_id: str) -> JsonObject:
        """``GET /v1/jobs/:id`` -- ``{id, kind, status: running|succeeded|failed, progress, result, error, ...}``."""
        return self._object("GET", f"/v1/jobs/{_seg(job_id)}")

    def wait_for_job(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        interval: float = 0.25,
        on_progress: Optional[Callable[[JsonObject], None]] = None,
    ) -> JsonObject:
        """Poll a job until it ends; returns the succeeded job, raises :class:`ControllerError`
        (with the job's error code) if it failed, :class:`forkd.TimeoutError` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.get("status") == "succeeded":
                return job
            url = self._url(f"/v1/jobs/{_seg(job_id)}")
            if job.get("status") == "failed":
                err = job.get("error") or {}
                body = {"error": err.get("message", "the job failed"), "code": err.get("code", "internal")}
                raise ControllerError(None, body, url, message=f"job {job_id} failed: {body['error']} ({body['code']})")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(None, job, url, message=f"job {job_id} was still {job.get('status')} after {timeout} s")
            time.sleep(interval)

    # --- internals ----------------------------------------------------

    def _long(self) -> Optional[float]:
        return None if self.timeout is None else max(self.timeout, LONG_CALL_TIMEOUT)

    def _url(self, path: str, query: Optional[Mapping[str, str]] = None) -> str:
        return f"{self.base_url}{path}{'?' + urlencode(query) if query else ''}"

    def _open(
        self,
        method: str,
        path: str,
        body: Any = _NO_BODY,
        query: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Tuple[str, http.client.HTTPConnection, http.client.HTTPResponse]:
        url = self._url(path, query)
        headers = {"Accept": "application/json", "User-Agent": f"forkd-python/{__version__}"}
        data = None
        if body is not _NO_BODY:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token and not self._endpoint.is_unix:
            headers["Authorization"] = f"Bearer {self.token}"
        target = f"{self._endpoint.prefix}{path}{'?' + urlencode(query) if query else ''}"
        conn = _transport.open_connection(self._endpoint, timeout, self._ssl_context)
        try:
            conn.request(method, target, body=data, headers=headers)
            return url, conn, conn.getresponse()
        except Exception as e:
            conn.close()
            raise self._transport_error(e, url, timeout) from e

    def _transport_error(self, e: Exception, url: str, timeout: Optional[float]) -> Exception:
        if isinstance(e, (socket.timeout, builtins.TimeoutError)):
            return TimeoutError(None, {}, url, message=f"controller {url}: no answer within {timeout} s")
        if isinstance(e, (OSError, http.client.HTTPException)):
            where = self.base_url if self._endpoint.is_unix else url
            hint = (
                "is `forkd daemon` running? Point the SDK at it with base_url= or FORKD_URL "
                "(http://host:port or unix:/path/to/forkd.sock)"
            )
            return ConnectionError(
                None,
                {},
                url,
                message=f"cannot reach the forkd daemon at {where} (from {self._endpoint.source}): {e}; {hint}",
            )
        return e

    def _request(
        self,
        method: str,
        path: str,
        body: Any = _NO_BODY,
        *,
        query: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        eff_timeout = self.timeout if timeout is None else timeout
        url, conn, resp = self._open(method, path, body, query, eff_timeout)
        try:
            raw = resp.read()
        except Exception as e:
            raise self._transport_error(e, url, eff_timeout) from e
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type") or ""
        if resp.status >= 400:
            parsed: Any
            try:
                parsed = json.loads(raw) if raw else {}
            except ValueError:
                parsed = raw.decode("utf-8", errors="replace")
            raise error_from_response(resp.status, parsed, url)
        if not raw:
            return None
        if "json" in ctype or not ctype:
            try:
                return json.loads(raw)
            except ValueError:
                if "json" in ctype:
                    raise
        return raw.decode("utf-8", errors="replace")

    # The routes' answer shapes are the daemon's OpenAPI document; these name them for
    # type checkers (one cast each) and do not re-check them.

    def _object(
        self, method: str, path: str, body: Any = _NO_BODY, *, query: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None
    ) -> JsonObject:
        return cast(JsonObject, self._request(method, path, body, query=query, timeout=timeout))

    def _objects(self, method: str, path: str, body: Any = _NO_BODY, *, timeout: Optional[float] = None) -> List[JsonObject]:
        return cast(List[JsonObject], self._request(method, path, body, timeout=timeout))

    def _text(self, method: str, path: str) -> str:
        return cast(str, self._request(method, path))

    def _ndjson(
        self,
        method: str,
        path: str,
        body: Any = _NO_BODY,
        *,
        timeout: Optional[float] = None,
        on_connection: Optional[Callable[[http.client.HTTPConnection], None]] = None,
    ) -> Iterator[JsonObject]:
        url, conn, resp = self._open(method, path, body, None, timeout)
        try:
            if on_connection is not None:
                on_connection(conn)
            if resp.status >= 400:
                raw = resp.read()
                try:
                    parsed: Any = json.loads(raw) if raw else {}
                except ValueError:
                    parsed = raw.decode("utf-8", errors="replace")
                raise error_from_response(resp.status, parsed, url)
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise self._transport_error(e, url, timeout) from e
                if not line:
                    return
                line = line.strip()
                if line:
                    yield cast(JsonObject, json.loads(line))
        finally:
            conn.close()


def _exec_body(args: Any, env: Any, cwd: Optional[str], stdin: Any) -> Dict[str, Any]:
    """The body exec and exec/stream share: a str runs through the shell, a list as argv; bytes stdin goes base64."""
    body: Dict[str, Any] = {"cmd": args} if isinstance(args, str) else {"args": list(args)}
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if stdin is not None:
        if isinstance(stdin, bytes):
            body["stdin"] = base64.b64encode(stdin).decode("ascii")
            body["stdin_encoding"] = "base64"
        else:
            body["stdin"] = stdin
    return body
