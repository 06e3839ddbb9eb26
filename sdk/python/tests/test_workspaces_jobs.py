"""Workspaces (forkd's, not in its SDKs) and jobs (pack/unpack) through the Controller."""

from __future__ import annotations

import pytest
from conftest import TAG, Daemon

import forkd


def test_workspace_suspend_and_resume_keep_its_state(ctl: forkd.Controller) -> None:
    ws = ctl.create_workspace("py-ws", TAG)
    try:
        assert ws["name"] == "py-ws" and ws["status"] == "running" and ws["source_snapshot_tag"] == TAG
        first = ws["live_sandbox_id"]
        assert ctl.get_sandbox(first)["id"] == first  # a workspace's sandbox is an ordinary sandbox
        ctl.exec_command(first, ["sh", "-c", "echo kept > /root/ws.txt"])
        with pytest.raises(forkd.ConflictError):
            ctl.create_workspace("py-ws", TAG)

        ws = ctl.suspend_workspace("py-ws")
        assert ws["status"] == "suspended" and "live_sandbox_id" not in ws and ws["current_state_tag"]
        with pytest.raises(forkd.NotFoundError):
            ctl.get_sandbox(first)
        assert ctl.get_workspace("py-ws")["status"] == "suspended"

        ws = ctl.resume_workspace("py-ws")
        assert ws["status"] == "running" and ws["live_sandbox_id"] != first
        assert ctl.exec_command(ws["live_sandbox_id"], ["cat", "/root/ws.txt"])["stdout"] == "kept\n"
        assert [w["name"] for w in ctl.list_workspaces()] == ["py-ws"]
    finally:
        ctl.delete_workspace("py-ws")
    with pytest.raises(forkd.NotFoundError):
        ctl.get_workspace("py-ws")
    with pytest.raises(forkd.NotFoundError):
        ctl.get_sandbox(ws["live_sandbox_id"])


def test_pack_and_unpack_jobs(daemon: Daemon, ctl: forkd.Controller) -> None:
    # Over TCP a pack is named inside $FORKD_HOME/packs: the daemon confines it there.
    pack = daemon.home / "packs" / "warm.pack"
    seen: list[forkd.controller.JsonObject] = []
    job = ctl.pack_snapshot(TAG, pack.name)
    assert job["kind"] == "pack" and job["id"].startswith("job-")
    done = ctl.wait_for_job(job["id"], timeout=300, on_progress=seen.append)
    assert done["status"] == "succeeded" and seen[-1]["status"] == "succeeded"
    assert done["result"]["pack_bytes"] == pack.stat().st_size > 0
    assert ctl.get_job(job["id"])["status"] == "succeeded"

    done = ctl.wait_for_job(ctl.unpack_snapshot(pack.name, tag="py-unpacked")["id"], timeout=300)
    assert done["result"]["tag"] == "py-unpacked"
    assert ctl.get_snapshot("py-unpacked")["status"] == "ready"
    ctl.delete_snapshot("py-unpacked")
    pack.unlink()

    garbage = daemon.home / "packs" / "garbage.pack"
    garbage.write_bytes(b"this is not a forkd pack\n" * 100)
    with pytest.raises(forkd.ControllerError) as e:
        ctl.wait_for_job(ctl.unpack_snapshot(garbage.name)["id"], timeout=300)
    assert e.value.code not in ("http_error", "internal")
    with pytest.raises(forkd.NotFoundError):
        ctl.get_job("job-000000000000")
