"""forkd's Controller API (and our extras) against a real daemon and real VMs."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from conftest import TAG, Daemon

import forkd


def _tags(snapshots: list[forkd.controller.JsonObject]) -> dict[str, forkd.controller.JsonObject]:
    return {s["tag"]: s for s in snapshots}


def test_tcp_with_token(daemon: Daemon, ctl: forkd.Controller) -> None:
    assert not ctl.is_unix_socket
    assert ctl.health() == {"ok": True}
    assert ctl.version()["api"] == "v1"
    snaps = ctl.list_snapshots()
    assert isinstance(snaps, list)  # forkd's bare array
    warm = _tags(snaps)[TAG]
    assert warm["status"] == "ready"
    assert isinstance(warm["dir"], str) and warm["dir"].startswith("/")
    assert isinstance(warm["created_at_unix"], int)
    assert warm["memory_mib"] == 128
    assert ctl.get_snapshot(TAG)["tag"] == TAG
    assert ctl.snapshot_status(TAG)["status"] == "ready"
    info = ctl.snapshot_info(TAG)
    assert info["tag"] == TAG and info["chain_depth"] == 0 and info["vmstate_bytes"] > 0
    assert info["ancestors"] == [] and isinstance(info["dependents"], list)


def test_unix_socket_without_token(daemon: Daemon) -> None:
    c = forkd.Controller(base_url=daemon.unix_url, token=None)
    assert c.is_unix_socket
    assert TAG in _tags(c.list_snapshots())
    # unix:///abs/path is the same socket.
    assert TAG in _tags(forkd.Controller(base_url=f"unix://{daemon.socket}").list_snapshots())


def test_default_is_the_local_socket_then_env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORKD_URL", raising=False)
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    monkeypatch.setenv("FORKD_RUN_DIR", str(daemon.run_dir))
    # The daemon's --socket is root/forkd.sock; the default is $FORKD_RUN_DIR/forkd.sock.
    (daemon.run_dir / "forkd.sock").symlink_to(daemon.socket)
    try:
        c = forkd.Controller()
        assert c.is_unix_socket and c.base_url == f"unix:{daemon.run_dir / 'forkd.sock'}"
        assert TAG in _tags(c.list_snapshots())
    finally:
        (daemon.run_dir / "forkd.sock").unlink()
    # No socket there: the TCP default.
    assert forkd.Controller().base_url == "http://127.0.0.1:8889"
    # FORKD_URL and FORKD_TOKEN, like forkd.
    monkeypatch.setenv("FORKD_URL", daemon.url + "/")
    monkeypatch.setenv("FORKD_TOKEN", daemon.token)
    c = forkd.Controller()
    assert not c.is_unix_socket and c.base_url == daemon.url
    assert TAG in _tags(c.list_snapshots())
    monkeypatch.setenv("FORKD_URL", daemon.unix_url)
    assert forkd.Controller().is_unix_socket
    # No FORKD_TOKEN: a daemon on loopback gets the local token file, a remote one never.
    monkeypatch.delenv("FORKD_TOKEN")
    monkeypatch.setenv("FORKD_URL", daemon.url)
    monkeypatch.setenv("FORKD_HOME", str(daemon.home))
    (daemon.home / "token").write_text(daemon.token + "\n")
    try:
        # A token file group or others can read is anyone's: refused, naming the fix.
        (daemon.home / "token").chmod(0o644)
        with pytest.raises(forkd.InsecureTokenFileError, match="chmod 600"):
            forkd.Controller()
        (daemon.home / "token").chmod(0o600)
        assert TAG in _tags(forkd.Controller().list_snapshots())
        assert forkd.Controller(base_url="http://192.0.2.1:8889").token is None
        with pytest.raises(forkd.AuthError):
            forkd.Controller(token="").list_snapshots()
    finally:
        (daemon.home / "token").unlink()


def test_spawn_exec_eval_ping_kill(ctl: forkd.Controller, spawned: list[str]) -> None:
    children = ctl.spawn_sandboxes(TAG, n=2)
    spawned.extend(c["id"] for c in children)
    assert isinstance(children, list) and len(children) == 2
    for info in children:
        assert info["snapshot_tag"] == TAG
        assert info["has_branched"] is False and info["branch_count"] == 0
        assert info["last_branch_memory_path"] is None
    a, b = (c["id"] for c in children)
    assert a != b
    listed = {s["id"] for s in ctl.list_sandboxes()}
    assert {a, b} <= listed
    assert ctl.get_sandbox(a)["id"] == a

    res = ctl.exec_command(a, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res["stdout"], res["stderr"], res["exit_code"]) == ("out\n", "err\n", 3)
    # argv is not split by a shell.
    assert ctl.exec_command(a, ["printf", "%s|", "one two", "$HOME"])["stdout"] == "one two|$HOME|"
    # Our extra: a string runs through the shell, with env and cwd.
    res = ctl.exec_command(a, "echo $((6 * 7)) $GREETING; pwd", env={"GREETING": "hi"}, cwd="/tmp")
    assert res["stdout"] == "42 hi\n/tmp\n" and res["exit_code"] == 0
    # Each child is its own machine.
    names = {ctl.exec_command(i, ["hostname"])["stdout"] for i in (a, b)}
    assert len(names) == 2

    ev = ctl.eval_code(a, "answer + 1")  # `answer` was defined while warming the snapshot
    assert ev["error"] is None and ev["exit_code"] == 0 and ev["result"] == "42"
    ctl.eval_code(a, "globalThis.mine = 'a'")
    assert ctl.eval_code(a, "mine")["value"] == "a"
    assert ctl.eval_code(b, "typeof mine")["value"] == "undefined"  # state is per sandbox
    bad = ctl.eval_code(a, "null.x")
    assert bad["result"] is None and bad["exit_code"] == 1 and "TypeError" in bad["error"]

    assert ctl.ping_sandbox(b)["pong"] is True

    ctl.kill_sandbox(a)
    with pytest.raises(forkd.NotFoundError):
        ctl.get_sandbox(a)
    assert a not in {s["id"] for s in ctl.list_sandboxes()}
    assert ctl.ping_sandbox(b)["pong"] is True  # its sibling is untouched


@pytest.fixture(scope="module")
def child(daemon: Daemon) -> Iterator[str]:
    """One sandbox shared by the tests below (each works in its own paths)."""
    c = daemon.unix()
    [info] = c.spawn_sandboxes(TAG)
    yield info["id"]
    try:
        c.kill_sandbox(info["id"])
    except forkd.NotFoundError:
        pass


def test_files(ctl: forkd.Controller, child: str) -> None:
    sid = child
    blob = bytes(range(256)) * 4
    ctl.make_dir(sid, "/root/py/data")
    ctl.write_file(sid, "/root/py/data/blob.bin", blob)
    ctl.write_file(sid, "/root/py/data/note.txt", "héllo\n")
    assert ctl.read_file(sid, "/root/py/data/blob.bin") == blob
    assert ctl.read_file(sid, "/root/py/data/note.txt") == "héllo\n".encode()
    entries = {e["name"]: e for e in ctl.list_files(sid, "/root/py/data")}
    assert set(entries) == {"blob.bin", "note.txt"}
    assert entries["blob.bin"]["size"] == 1024 and entries["blob.bin"]["type"] == "file"
    assert ctl.exec_command(sid, ["cat", "/root/py/data/note.txt"])["stdout"] == "héllo\n"
    ctl.remove_file(sid, "/root/py", recursive=True)
    with pytest.raises(forkd.NotFoundError):
        ctl.stat_file(sid, "/root/py")


def test_live_branch_without_wait_then_spawn_from_it(ctl: forkd.Controller, child: str, spawned: list[str]) -> None:
    sid = child
    ctl.exec_command(sid, ["sh", "-c", "echo before-branch > /root/state.txt"])
    ctl.eval_code(sid, "globalThis.counter = 7")

    tag = "py-live-branch"
    started = time.monotonic()
    snap = ctl.branch_sandbox(sid, tag=tag, mode="live", wait=False)
    assert snap["tag"] == tag and snap["status"] == "writing" and snap["branched_from"] == sid
    assert isinstance(snap["pause_ms"], (int, float))
    # The source runs again at once, and may change without touching the branch.
    ctl.exec_command(sid, ["sh", "-c", "echo after-branch > /root/state.txt"])

    # forkd's way to see completion: poll the list until the entry says ready.
    while True:
        entry = _tags(ctl.list_snapshots()).get(tag)
        assert entry is not None, "a BRANCH in progress is listed"
        assert entry["status"] in ("writing", "ready"), entry
        if entry["status"] == "ready":
            break
        assert time.monotonic() - started < 120, "the live BRANCH did not finish in 2 minutes"
        time.sleep(0.1)
    assert ctl.wait_for_snapshot(tag, timeout=5)["status"] == "ready"

    info = ctl.get_sandbox(sid)
    assert info["has_branched"] is True and info["branch_count"] == 1

    [grandchild] = ctl.spawn_sandboxes(tag)
    spawned.append(grandchild["id"])
    assert grandchild["snapshot_tag"] == tag
    assert ctl.exec_command(grandchild["id"], ["cat", "/root/state.txt"])["stdout"] == "before-branch\n"
    assert ctl.eval_code(grandchild["id"], "counter")["result"] == "7"
    assert ctl.exec_command(sid, ["cat", "/root/state.txt"])["stdout"] == "after-branch\n"

    # A BRANCH onto a tag that exists is a conflict.
    with pytest.raises(forkd.ConflictError) as e:
        ctl.branch_sandbox(sid, tag=tag)
    assert e.value.status == 409

    ctl.kill_sandbox(grandchild["id"])
    ctl.delete_snapshot(tag)
    with pytest.raises(forkd.NotFoundError):
        ctl.get_snapshot(tag)
    assert tag not in _tags(ctl.list_snapshots())
