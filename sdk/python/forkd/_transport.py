"""Where the daemon is, and HTTP/1.1 to it over TCP or a unix socket (standard library only)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8889"
DEFAULT_RUN_DIR = "/run/forkd"


def is_loopback(host: str) -> bool:
    """localhost, 127.x.y.z or ::1."""
    host = host.strip("[]").lower()
    if host in ("localhost", "::1"):
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() for p in parts)


class InsecureTokenFileError(PermissionError):
    """The daemon's token file is open to group or others: anyone on the host could use it."""


def local_token() -> Optional[str]:
    """The local daemon's token, ``$FORKD_HOME/token`` (``/var/lib/forkd/token``), if readable.

    Refused (InsecureTokenFileError) when group or others may read or change it, as the
    daemon itself refuses it: such a token is anyone's on this host.
    """
    path = os.path.join(os.environ.get("FORKD_HOME") or "/var/lib/forkd", "token")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, encoding="utf-8") as f:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            raise InsecureTokenFileError(
                f"the token file {path} has mode {mode:04o}: group or others can read or change it, "
                f"so anyone on this host could use the daemon's token; run: chmod 600 {path}"
            )
        return f.read().strip() or None


def default_socket_path() -> str:
    """``$FORKD_RUN_DIR/forkd.sock``, ``/run/forkd/forkd.sock`` by default."""
    return os.path.join(os.environ.get("FORKD_RUN_DIR") or DEFAULT_RUN_DIR, "forkd.sock")


@dataclass(frozen=True)
class Endpoint:
    """A parsed daemon address: a unix socket, or http(s)://host:port[/prefix]."""

    scheme: str  # "unix", "http" or "https"
    base_url: str  # as shown in errors: "unix:/run/forkd/forkd.sock" or "http://127.0.0.1:8889"
    source: str  # where it came from: "base_url", "FORKD_URL", "default socket" or "default URL"
    socket_path: Optional[str] = None
    host: str = ""
    port: int = 0
    prefix: str = ""

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"


def parse_endpoint(url: str, source: str) -> Endpoint:
    """``unix:/path/to.sock`` (or ``unix:///path``), or ``http(s)://host[:port][/prefix]``."""
    url = url.strip()
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"{source}: {url!r} names no socket; use unix:/path/to/forkd.sock")
        return Endpoint(scheme="unix", base_url=f"unix:{path}", source=source, socket_path=path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{source}: {url!r} is not http://host:port, https://host:port or unix:/path/to/forkd.sock")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"{source}: {url!r} has a bad port") from e
    prefix = parts.path.rstrip("/")
    base = url.rstrip("/")
    return Endpoint(scheme=parts.scheme, base_url=base, source=source, host=parts.hostname, port=port, prefix=prefix)


def resolve_endpoint(base_url: Optional[str]) -> Endpoint:
    """The base_url argument, else ``$FORKD_URL``, else the local socket if it exists, else http://127.0.0.1:8889."""
    if base_url:
        return parse_endpoint(base_url, "base_url")
    env = os.environ.get("FORKD_URL")
    if env:
        return parse_endpoint(env, "FORKD_URL")
    sock = default_socket_path()
    if os.path.exists(sock):
        return Endpoint(scheme="unix", base_url=f"unix:{sock}", source="default socket", socket_path=sock)
    return parse_endpoint(DEFAULT_URL, "default URL")


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` over an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: Optional[float]) -> None:
        # The Host header is required by HTTP/1.1; the daemon does not look at it.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def open_connection(
    endpoint: Endpoint, timeout: Optional[float], ssl_context: Optional[ssl.SSLContext] = None
) -> http.client.HTTPConnection:
    if endpoint.scheme == "unix":
        assert endpoint.socket_path is not None
        return UnixHTTPConnection(endpoint.socket_path, timeout)
    if endpoint.scheme == "https":
        return http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=timeout, context=ssl_context)
    return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
