"""An E2B-shaped ``Sandbox`` over the forkd daemon.

Unlike forkd v0.5.3's ``Sandbox`` (which ran ``forkd fork`` and spoke TCP to a
guest agent), this one goes through the daemon's REST API, so it works over
the unix socket or any URL a :class:`~forkd.Controller` can reach:

>>> from forkd import Sandbox
>>> with Sandbox.create(template="my-warm-tag") as sb:
...     print(sb.commands.run("echo hi").stdout)
...     sb.files.write("/root/x.txt", "hello")
...     print(sb.run_code("1 + 1").text)
...     branch = sb.branch(mode="live")
hi
<BLANKLINE>
2
"""

from __future__ import annotations

import http.client
import json
import math
import os
import posixpath
import socket
import threading
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .controller import Controller, JsonObject
from .errors import ControllerError, NotFoundError, TimeoutError

__all__ = [
    "ALL_TRAFFIC",
    "DEFAULT_SANDBOX_TIMEOUT_MS",
    "CommandHandle",
    "CommandResult",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "Logs",
    "Result",
    "Sandbox",
    "WriteInfo",
]

#: E2B's name for every IPv4 destination: ``network={"deny_out": [ALL_TRAFFIC], "allow_out": [...]}`` is an allow-list.
ALL_TRAFFIC = "0.0.0.0/0"

#: A sandbox is killed this long after it starts unless told otherwise (E2B's default, 5 minutes).
DEFAULT_SANDBOX_TIMEOUT_MS = 300_000

#: The daemon's longest exec time limit (1 hour); ``timeout=None`` or ``0`` asks for it.
MAX_COMMAND_TIMEOUT_SECS = 3600


@dataclass
class CommandResult:
    """Result of ``sandbox.commands.run(...)``: forkd's fields (stdout, stderr, exit_code) and more.

    Unlike E2B, a non-zero exit code does not raise (as in forkd): check ``exit_code``.
    ``error`` says why a command ended abnormally (timed out, killed by a signal).
    """

    stdout: str
    stderr: str
    exit_code: int
    error: Optional[str] = None
    signal: Optional[str] = None
    timed_out: bool = False
    duration_ms: Optional[float] = None
    truncated: bool = False


class CommandHandle:
    """A command started with ``background=True``: ``wait()`` for its result, or ``kill()`` it.

    The command runs over a streamed exec in a thread of this process; ``kill()``
    closes that stream, which makes the daemon stop the command (its whole
    process group) in the guest. ``pid`` is None: the guest's pid is not reported.
    """

    pid: Optional[int] = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Optional[http.client.HTTPConnection] = None
        self._killed = False
        self._result: Optional[CommandResult] = None
        self._error: Optional[BaseException] = None
        self._stdout: List[str] = []
        self._stderr: List[str] = []
        self._thread: Optional[threading.Thread] = None

    def _attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            if self._killed:
                self._close()

    def _close(self) -> None:
        sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def stdout(self) -> str:
        """Output so far."""
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """The :class:`CommandResult` once the command ends (``error="killed"`` after ``kill()``).

        Raises :class:`forkd.TimeoutError` if it is still running after ``timeout`` seconds,
        and whatever error the run itself ended with.
        """
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(None, {}, "", message=f"the command is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def kill(self) -> bool:
        """Stop the command; False if it had already ended."""
        with self._lock:
            if not self.is_running() or self._killed:
                return False
            self._killed = True
            self._close()
        return True

    def _run(self, start: Callable[[], Mapping[str, Any]]) -> None:
        try:
            exit_line = start()
            self._result = _command_result(self.stdout, self.stderr, exit_line)
        except (ControllerError, OSError) as e:
            if self._killed:
                self._result = CommandResult(self.stdout, self.stderr, 128 + 9, error="killed", signal="SIGKILL")
            else:
                self._error = e
        except BaseException as e:  # handed to wait()
            self._error = e


def _command_result(stdout: str, stderr: str, res: Mapping[str, Any]) -> CommandResult:
    exit_code = res.get("exit_code")
    signal = res.get("signal")
    timed_out = bool(res.get("timed_out"))
    error = None
    if timed_out:
        error = "timed out"
    elif signal:
        error = f"killed by {signal}"
    return CommandResult(
        stdout=stdout,
        stderr=stderr,
        # A process killed by a signal has no exit code: report it as a shell would.
        exit_code=int(exit_code) if exit_code is not None else 128 + 9,
        error=error,
        signal=signal,
        timed_out=timed_out,
        duration_ms=res.get("duration_ms"),
        truncated=bool(res.get("truncated")),
    )


class Commands:
    """``sandbox.commands``: run commands in the sandbox."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    def run(
        self,
        cmd: Union[str, Sequence[str]],
        background: bool = False,
        envs: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[Callable[[str], None]] = None,
        on_stderr: Optional[Callable[[str], None]] = None,
        timeout: Optional[float] = 60,
        stdin: Optional[Union[str, bytes]] = None,
    ) -> Any:
        """Run ``cmd``: a ``str`` through ``/bin/sh -c``, a list as argv (no shell).

        Returns a :class:`CommandResult` (stdout, stderr, exit_code), or with
        ``background=True`` a :class:`CommandHandle`. ``timeout`` is in seconds as in
        E2B (None or 0: the daemon's maximum, one hour); ``on_stdout``/``on_stderr``
        receive output as it is produced.
        """
        sb = self._sandbox
        env = {**sb.envs, **(dict(envs) if envs else {})}
        secs = MAX_COMMAND_TIMEOUT_SECS if not timeout else max(1, math.ceil(timeout))
        args: Union[str, List[str]] = cmd if isinstance(cmd, str) else list(cmd)
        if not background and on_stdout is None and on_stderr is None:
            res = sb.controller.exec_command(sb.sandbox_id, args, secs, env=env, cwd=cwd, stdin=stdin)
            return _command_result(res.get("stdout") or "", res.get("stderr") or "", res)

        handle = CommandHandle()

        def sink(parts: List[str], callback: Optional[Callable[[str], None]]) -> Callable[[bytes], None]:
            def take(data: bytes) -> None:
                text = data.decode("utf-8", errors="replace")
                parts.append(text)
                if callback is not None:
                    callback(text)

            return take

        def start() -> Mapping[str, Any]:
            return sb.controller.exec_stream(
                sb.sandbox_id,
                args,
                on_stdout=sink(handle._stdout, on_stdout),
                on_stderr=sink(handle._stderr, on_stderr),
                timeout_ms=secs * 1000,
                env=env,
                cwd=cwd,
                stdin=stdin,
                on_connection=handle._attach,
            )

        if not background:
            exit_line = start()
            return _command_result(handle.stdout, handle.stderr, exit_line)
        handle._thread = threading.Thread(target=handle._run, args=(start,), name="forkd-command", daemon=True)
        handle._thread.start()
        return handle


@dataclass
class EntryInfo:
    """One entry of ``sandbox.files.list(...)`` (E2B's EntryInfo)."""

    name: str
    type: str  # "file", "dir", "symlink" or "other"
    path: str
    size: int = 0
    mode: int = 0
    modified_time_ms: Optional[float] = None


@dataclass
class WriteInfo:
    """What ``sandbox.files.write(...)`` wrote (E2B's WriteInfo)."""

    name: str
    type: str
    path: str
    size: Optional[int] = None


def _entry(path: str, raw: Mapping[str, Any]) -> EntryInfo:
    return EntryInfo(
        name=str(raw.get("name") or posixpath.basename(path.rstrip("/")) or path),
        type=str(raw.get("type") or "other"),
        path=path,
        size=int(raw.get("size") or 0),
        mode=int(raw.get("mode") or 0),
        modified_time_ms=raw.get("mtimeMs", raw.get("mtime_ms")),
    )


class Files:
    """``sandbox.files``: read, write and list files in the sandbox."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    def read(self, path: str, format: str = "text") -> Union[str, bytes]:  # noqa: A002 - E2B's name
        """A file's content: ``format="text"`` (UTF-8) or ``"bytes"``."""
        data = self._sandbox.controller.read_file(self._sandbox.sandbox_id, path)
        if format == "bytes":
            return data
        if format != "text":
            raise ValueError(f"format must be 'text' or 'bytes', not {format!r}")
        return data.decode("utf-8")

    def write(self, path: str, data: Union[str, bytes, bytearray, IO[Any]]) -> WriteInfo:
        """Write ``data`` (text, bytes, or a readable file object) to ``path``, atomically,
        creating missing parent directories."""
        if not isinstance(data, (str, bytes, bytearray, memoryview)) and hasattr(data, "read"):
            data = data.read()
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"data must be str, bytes or a file object, not {type(data).__name__}")
        ctl, sid = self._sandbox.controller, self._sandbox.sandbox_id
        try:
            res = ctl.write_file(sid, path, data)
        except NotFoundError:
            # As in E2B, missing parent directories are created.
            parent = posixpath.dirname(path.rstrip("/"))
            if not parent or parent == path or self.exists(parent):
                raise
            ctl.make_dir(sid, parent)
            res = ctl.write_file(sid, path, data)
        written = str(res.get("path") or path)
        return WriteInfo(name=posixpath.basename(written), type="file", path=written, size=res.get("size"))

    def list(self, path: str) -> List[EntryInfo]:
        """The entries of a directory."""
        base = path.rstrip("/") or "/"
        return [_entry(posixpath.join(base, str(e.get("name"))), e) for e in self._sandbox.controller.list_files(self._sandbox.sandbox_id, path)]

    def get_info(self, path: str) -> EntryInfo:
        """Type, size and mode of one path; :class:`~forkd.NotFoundError` if absent."""
        return _entry(path, self._sandbox.controller.stat_file(self._sandbox.sandbox_id, path))

    def exists(self, path: str) -> bool:
        try:
            self._sandbox.controller.stat_file(self._sandbox.sandbox_id, path)
            return True
        except NotFoundError:
            return False

    def make_dir(self, path: str) -> bool:
        """``mkdir -p``; True if it was created, False if it existed."""
        existed = self.exists(path)
        self._sandbox.controller.make_dir(self._sandbox.sandbox_id, path)
        return not existed

    def remove(self, path: str) -> None:
        """Remove a file or a whole directory tree."""
        self._sandbox.controller.remove_file(self._sandbox.sandbox_id, path, recursive=True)


@dataclass
class Result:
    """The value of the last expression of ``run_code`` (E2B's Result, text only, plus the JSON value)."""

    text: Optional[str]
    value: Any = None
    type: Optional[str] = None
    is_main_result: bool = True

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class Logs:
    stdout: List[str] = field(default_factory=list)
    stderr: List[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    """An error raised by the code (E2B's ExecutionError): ``name``, ``value`` (the message), ``traceback``."""

    name: str
    value: str
    traceback: str = ""


@dataclass
class Execution:
    """What ``run_code`` returns (E2B's Execution). A failing snippet does not raise: see ``error``."""

    results: List[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: Optional[ExecutionError] = None
    duration_ms: Optional[float] = None

    @property
    def text(self) -> Optional[str]:
        """The text of the main result, None if there is none."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None

    @property
    def value(self) -> Any:
        """forkd's addition: the main result as a JSON value (when it has one)."""
        for r in self.results:
            if r.is_main_result:
                return r.value
        return None


_NO_RESULT_TYPES = ("undefined", "NoneType")


def _execution(res: Mapping[str, Any]) -> Execution:
    logs = Logs(
        stdout=[res["stdout"]] if res.get("stdout") else [],
        stderr=[res["stderr"]] if res.get("stderr") else [],
    )
    error_text = res.get("error")
    if error_text:
        error_line = str(error_text)
        name, sep, message = error_line.partition(": ")
        if not sep or " " in name:
            name, message = str(res.get("name") or "Error"), error_line
        traceback = res.get("traceback") or res.get("stack") or ""
        details = res.get("details")
        if not traceback and isinstance(details, dict):
            traceback = details.get("traceback") or details.get("stack") or ""
        return Execution(
            logs=logs,
            error=ExecutionError(name=str(res.get("name") or name), value=message, traceback=str(traceback)),
            duration_ms=res.get("duration_ms"),
        )
    results: List[Result] = []
    value = res.get("value")
    result = res.get("result")
    text: Optional[str]
    if isinstance(result, str):
        text = result
    elif value is not None:
        text = value if isinstance(value, str) else json.dumps(value)
    else:
        text = None if result is None else str(result)
    if res.get("type") not in _NO_RESULT_TYPES and (text is not None or value is not None):
        results.append(Result(text=text, value=value, type=res.get("type")))
    return Execution(results=results, logs=logs, duration_ms=res.get("duration_ms"))


class Sandbox:
    """One sandbox, E2B-shaped: ``commands``, ``files``, ``run_code``, ``kill``; plus forkd's ``branch`` and ``fork``.

    Make one with :meth:`create` (or :meth:`fork` for many, :meth:`connect` for an
    existing one). As a context manager it is killed on exit.
    """

    def __init__(self, sandbox_id: str, controller: Controller, info: Optional[JsonObject] = None, envs: Optional[Mapping[str, str]] = None) -> None:
        self.sandbox_id = sandbox_id
        self.controller = controller
        self.info: JsonObject = dict(info or {})
        self.envs: Dict[str, str] = dict(envs or {})
        self.commands = Commands(self)
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, base_url={self.controller.base_url!r})"

    @property
    def template(self) -> Optional[str]:
        """The snapshot this sandbox was forked from."""
        return self.info.get("snapshot_tag")

    # --- making sandboxes ----------------------------------------------

    @classmethod
    def create(
        cls,
        template: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
        envs: Optional[Mapping[str, str]] = None,
        *,
        timeout: Optional[float] = None,
        network: Union[bool, Mapping[str, Sequence[str]], None] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        allow_internet_access: Optional[bool] = None,
        cpu_limit: Optional[float] = None,
        memory_limit_mib: Optional[int] = None,
        controller: Optional[Controller] = None,
        base_url: Optional[str] = None,
        token: Optional[str] = None,
        request_timeout: Optional[float] = 60.0,
    ) -> "Sandbox":
        """Start one sandbox from the warm snapshot ``template`` (default ``$FORKD_TAG``, else ``"default"``).

        ``timeout_ms`` (or E2B's ``timeout`` in seconds): the sandbox is killed this
        long after it starts, 5 minutes by default. ``network=False`` or
        ``allow_internet_access=False``: no network at all. ``network={"allow_out": [...],
        "deny_out": [...]}`` (E2B's shape) and the flat ``allow_out``/``deny_out``
        are egress exceptions (IP, CIDR, IP:PORT), joined.
        """
        [sandbox] = cls.fork(
            template,
            1,
            timeout_ms=timeout_ms,
            metadata=metadata,
            envs=envs,
            timeout=timeout,
            network=network,
            allow_out=allow_out,
            deny_out=deny_out,
            allow_internet_access=allow_internet_access,
            cpu_limit=cpu_limit,
            memory_limit_mib=memory_limit_mib,
            controller=controller,
            base_url=base_url,
            token=token,
            request_timeout=request_timeout,
        )
        return sandbox

    @classmethod
    def fork(
        cls,
        template: Optional[str],
        n: int,
        *,
        timeout_ms: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        network: Union[bool, Mapping[str, Sequence[str]], None] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        allow_internet_access: Optional[bool] = None,
        cpu_limit: Optional[float] = None,
        memory_limit_mib: Optional[int] = None,
        controller: Optional[Controller] = None,
        base_url: Optional[str] = None,
        token: Optional[str] = None,
        request_timeout: Optional[float] = 60.0,
    ) -> List["Sandbox"]:
        """forkd's addition: ``n`` sandboxes from one warm snapshot in one call (options as :meth:`create`)."""
        if timeout_ms is not None and timeout is not None:
            raise ValueError("give timeout_ms or timeout (seconds), not both")
        if timeout is not None:
            timeout_ms = int(timeout * 1000)
        ctl = controller or Controller(base_url=base_url, token=token, timeout=request_timeout)
        tag = template or os.environ.get("FORKD_TAG") or "default"
        allow: List[str] = list(allow_out or [])
        deny: List[str] = list(deny_out or [])
        net_flag: Optional[bool] = None
        if isinstance(network, bool):
            net_flag = network
        elif network is not None:
            allow += list(network.get("allow_out") or network.get("allowOut") or [])
            deny += list(network.get("deny_out") or network.get("denyOut") or [])
        if allow_internet_access is False:
            net_flag = False
        infos = ctl.spawn_sandboxes(
            tag,
            n=n,
            memory_limit_mib=memory_limit_mib,
            network=net_flag,
            allow_out=allow or None,
            deny_out=deny or None,
            cpu_limit=cpu_limit,
            timeout_ms=DEFAULT_SANDBOX_TIMEOUT_MS if timeout_ms is None else timeout_ms,
            metadata=metadata,
        )
        return [cls(info["id"], ctl, info, envs) for info in infos]

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        controller: Optional[Controller] = None,
        base_url: Optional[str] = None,
        token: Optional[str] = None,
        request_timeout: Optional[float] = 60.0,
        envs: Optional[Mapping[str, str]] = None,
    ) -> "Sandbox":
        """Attach to a running sandbox; :class:`~forkd.NotFoundError` if there is none with that id."""
        ctl = controller or Controller(base_url=base_url, token=token, timeout=request_timeout)
        return cls(sandbox_id, ctl, ctl.get_sandbox(sandbox_id), envs)

    # --- using it ------------------------------------------------------

    def run_code(
        self,
        code: str,
        language: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[Callable[[str], None]] = None,
    ) -> Execution:
        """Evaluate ``code`` in the sandbox's warm runtime; state persists between calls.

        ``language``: ``"python"`` or ``"javascript"`` (``"js"``), the image's own by
        default. ``timeout`` in seconds. Returns an :class:`Execution`: ``text`` /
        ``results`` for the value of the last expression, ``logs``, and ``error``
        when the code raised (no exception is raised for that).
        """
        lang = {"js": "javascript", "node": "javascript", "py": "python", "python3": "python"}.get(language or "", language)
        res = self.controller.eval_code(
            self.sandbox_id,
            code,
            language=lang,
            timeout_ms=None if timeout is None else int(timeout * 1000),
        )
        execution = _execution(res or {})
        if on_stdout is not None:
            for chunk in execution.logs.stdout:
                on_stdout(chunk)
        return execution

    def eval(self, code: str) -> Any:
        """forkd's ``Sandbox.eval``: the value of ``code``; raises ``RuntimeError("forkd eval: ...")`` if it failed."""
        res = self.controller.eval_code(self.sandbox_id, code) or {}
        if res.get("error"):
            raise RuntimeError(f"forkd eval: {res['error']}")
        return res["value"] if "value" in res else res.get("result")

    def ping(self) -> JsonObject:
        return self.controller.ping_sandbox(self.sandbox_id)

    def branch(self, tag: Optional[str] = None, mode: Optional[str] = None, wait: bool = True) -> JsonObject:
        """forkd's addition: capture this running sandbox as a new snapshot (SnapshotInfo dict).

        ``mode``: ``"full"``, ``"diff"`` or ``"live"``. With ``wait=False`` it returns
        as soon as the sandbox runs again (``status: "writing"``); use
        ``controller.wait_for_snapshot(tag)`` before forking from it.
        """
        return self.controller.branch_sandbox(self.sandbox_id, tag=tag, mode=mode, wait=wait)

    def get_info(self) -> JsonObject:
        """The daemon's current view of this sandbox (SandboxInfo)."""
        self.info = self.controller.get_sandbox(self.sandbox_id)
        return self.info

    def is_running(self) -> bool:
        """True if its guest agent answers."""
        try:
            self.controller.ping_sandbox(self.sandbox_id)
            return True
        except ControllerError:
            return False

    def kill(self) -> bool:
        """Stop the sandbox; True if it was running, False if it was already gone."""
        try:
            self.controller.kill_sandbox(self.sandbox_id)
            return True
        except NotFoundError:
            return False

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.kill()
        except ControllerError:
            if exc_type is None:
                raise

