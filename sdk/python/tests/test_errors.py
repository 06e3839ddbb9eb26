"""Typed errors from a real daemon, and a daemon that is not there."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import TAG, Daemon

import forkd


def test_not_found_is_typed_with_code_and_remediation(daemon: Daemon, ctl: forkd.Controller) -> None:
    with pytest.raises(forkd.NotFoundError) as e:
        ctl.get_sandbox("sb-00000000dead")
    err = e.value
    assert isinstance(err, forkd.ControllerError) and isinstance(err, RuntimeError)
    assert err.status == 404 and err.code == "sandbox_not_found"
    assert isinstance(err.remediation, str) and err.remediation
    assert isinstance(err.body, dict) and isinstance(err.body["error"], str)  # forkd's {"error": "<message>"}
    assert err.url == f"{daemon.url}/v1/sandboxes/sb-00000000dead"
    assert str(err).startswith(f"controller {daemon.url}/v1/sandboxes/sb-00000000dead: HTTP 404: {{")

    with pytest.raises(forkd.NotFoundError) as e:
        ctl.get_snapshot("no-such-snapshot")
    assert e.value.code == "snapshot_not_found"
    with pytest.raises(forkd.NotFoundError):
        ctl.spawn_sandboxes("no-such-snapshot")
    with pytest.raises(forkd.NotFoundError):
        ctl.delete_snapshot("no-such-snapshot")


def test_path_params_are_url_encoded(ctl: forkd.Controller) -> None:
    # Sent as /v1/snapshots/a%2Fb: the daemon sees the tag "a/b" and refuses it as a tag,
    # instead of answering for a route /v1/snapshots/a/b that does not exist.
    with pytest.raises(forkd.BadRequestError) as e:
        ctl.get_snapshot("a/b")
    assert e.value.status == 400 and e.value.code == "invalid_tag"
    assert e.value.url.endswith("/v1/snapshots/a%2Fb")


def test_bad_requests(ctl: forkd.Controller) -> None:
    with pytest.raises(forkd.BadRequestError) as e:
        ctl.spawn_sandboxes(TAG, n=0)
    assert e.value.status in (400, 422)
    with pytest.raises(forkd.BadRequestError) as e:
        ctl.create_snapshot("bad tag!", memory_mib=128)
    assert e.value.status == 400 and e.value.code == "invalid_tag"


def test_bad_or_missing_token_is_an_auth_error(daemon: Daemon) -> None:
    wrong = "x" * 32
    with pytest.raises(forkd.AuthError) as e:
        forkd.Controller(base_url=daemon.url, token=wrong).list_snapshots()
    assert e.value.status == 401 and e.value.code == "unauthorized"
    assert wrong not in str(e.value) and daemon.token not in str(e.value)
    with pytest.raises(forkd.AuthError):
        forkd.Controller(base_url=daemon.url, token="").list_sandboxes()
    # /healthz needs no token (as in forkd).
    assert forkd.Controller(base_url=daemon.url, token=wrong).health() == {"ok": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_daemon_down_names_the_url_or_socket(daemon: Daemon, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(forkd.ConnectionError) as e:
        forkd.Controller(base_url=url, token="t" * 20, timeout=5).list_snapshots()
    err = e.value
    assert isinstance(err, forkd.ControllerError) and isinstance(err, OSError) and isinstance(err, ConnectionError)
    assert err.status is None and err.code == "unreachable"
    assert url in str(err) and err.url == f"{url}/v1/snapshots"
    assert "t" * 20 not in str(err)

    sock = tmp_path / "gone.sock"
    with pytest.raises(forkd.ConnectionError) as e:
        forkd.Controller(base_url=f"unix:{sock}").list_sandboxes()
    assert str(sock) in str(e.value)

    # A socket file nobody listens on (a daemon that died) is "down" too.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    with pytest.raises(forkd.ConnectionError) as e:
        forkd.Controller(base_url=f"unix:{tmp_path / 'dead.sock'}").ping_sandbox("sb-x")
    assert str(tmp_path / "dead.sock") in str(e.value)


def test_sandbox_create_from_a_missing_template(daemon: Daemon) -> None:
    with pytest.raises(forkd.NotFoundError) as e:
        forkd.Sandbox.create(template="no-such-template", base_url=daemon.unix_url)
    assert e.value.code == "snapshot_not_found"


def test_bad_base_url_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="ftp://x"):
        forkd.Controller(base_url="ftp://x")
