"""The E2B-shaped Sandbox against a real daemon and real VMs."""

from __future__ import annotations

import time

import pytest
from conftest import TAG, Daemon

import forkd
from forkd import Sandbox


def test_create_commands_files_run_code_and_context_manager(daemon: Daemon, ctl: forkd.Controller) -> None:
    with Sandbox.create(template=TAG, base_url=daemon.url, token=daemon.token, metadata={"owner": "pytest"}, timeout_ms=120_000) as sb:
        sid = sb.sandbox_id
        info = ctl.get_sandbox(sid)
        assert info["snapshot_tag"] == TAG and sb.template == TAG
        assert info["metadata"] == {"owner": "pytest"}
        assert info["expires_at"] is not None

        # commands: a string through the shell, a list as argv.
        r = sb.commands.run("echo hi; echo oops >&2; exit 2")
        assert isinstance(r, forkd.CommandResult)
        assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "oops\n", 2)
        assert sb.commands.run(["printf", "%s", "a b; echo not-a-shell"]).stdout == "a b; echo not-a-shell"
        r = sb.commands.run("echo $FOO; pwd", envs={"FOO": "bar"}, cwd="/tmp")
        assert r.stdout == "bar\n/tmp\n" and r.exit_code == 0
        assert sb.commands.run(["/no/such/program"]).exit_code == 127
        streamed: list[str] = []
        r = sb.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=streamed.append)
        assert "".join(streamed) == "line1\nline2\nline3\n" == r.stdout and r.exit_code == 0
        r = sb.commands.run("sleep 30", timeout=1)
        assert r.timed_out and r.exit_code != 0 and r.error == "timed out"

        # background: wait() for the result, or kill() it, which stops it in the guest.
        h = sb.commands.run("sleep 1; echo done", background=True)
        assert isinstance(h, forkd.CommandHandle)
        r = h.wait(timeout=60)
        assert (r.stdout, r.exit_code, r.error) == ("done\n", 0, None)
        assert h.kill() is False  # already over
        seen: list[str] = []
        h = sb.commands.run("echo started; sleep 37; touch /root/too-late", background=True, on_stdout=seen.append)
        deadline = time.monotonic() + 60
        while "started" not in "".join(seen):
            assert time.monotonic() < deadline, "the background command never started"
            time.sleep(0.05)
        assert "sleep 37" in sb.commands.run(["ps"]).stdout
        assert h.kill() is True
        r = h.wait(timeout=30)
        assert r.error == "killed" and r.stdout == "started\n"
        deadline = time.monotonic() + 30
        while "sleep 37" in sb.commands.run(["ps"]).stdout:
            assert time.monotonic() < deadline, "kill() did not stop the command in the guest"
            time.sleep(0.1)
        assert not sb.files.exists("/root/too-late")

        # files
        w = sb.files.write("/root/notes/a.txt", "hello")
        assert isinstance(w, forkd.WriteInfo) and w.path == "/root/notes/a.txt" and w.name == "a.txt"
        assert sb.files.read("/root/notes/a.txt") == "hello"
        sb.files.write("/root/notes/b.bin", b"\x00\xff\x10")
        assert sb.files.read("/root/notes/b.bin", format="bytes") == b"\x00\xff\x10"
        listed = {e.name: e for e in sb.files.list("/root/notes")}
        assert set(listed) == {"a.txt", "b.bin"}
        assert listed["a.txt"].type == "file" and listed["a.txt"].size == 5 and listed["a.txt"].path == "/root/notes/a.txt"
        assert sb.commands.run("cat /root/notes/a.txt").stdout == "hello"
        assert sb.files.exists("/root/notes/a.txt") and not sb.files.exists("/root/nope")
        assert sb.files.make_dir("/root/notes/sub") is True
        assert sb.files.get_info("/root/notes/sub").type == "dir"
        sb.files.remove("/root/notes")
        assert not sb.files.exists("/root/notes")
        with pytest.raises(forkd.NotFoundError):
            sb.files.read("/root/notes/a.txt")

        # run_code: the warm context, state kept between calls, errors reported not raised.
        ex = sb.run_code("answer + 1")
        assert isinstance(ex, forkd.Execution)
        assert ex.error is None and ex.text == "42" and ex.value == 42
        sb.run_code("globalThis.k = 5")
        assert sb.run_code("k * 2", language="js").text == "10"
        ex = sb.run_code("throw new TypeError('boom')")
        assert ex.results == [] and ex.text is None
        assert ex.error is not None and ex.error.name == "TypeError" and "boom" in ex.error.value
        assert sb.run_code("undefined").results == []
        assert sb.eval("[1, 2].map((x) => x * 3)") == [3, 6]  # forkd's Sandbox.eval
        with pytest.raises(RuntimeError, match="forkd eval: .*ReferenceError"):
            sb.eval("not_defined_anywhere")

        assert sb.is_running()
    # Leaving the block killed it.
    with pytest.raises(forkd.NotFoundError):
        ctl.get_sandbox(sid)
    assert sb.kill() is False


def test_context_manager_kills_when_the_body_raises(daemon: Daemon, ctl: forkd.Controller) -> None:
    with pytest.raises(ZeroDivisionError):
        with Sandbox.create(template=TAG, base_url=daemon.unix_url) as sb:
            sid = sb.sandbox_id
            assert ctl.get_sandbox(sid)["id"] == sid
            1 / 0  # noqa: B018
    with pytest.raises(forkd.NotFoundError):
        ctl.get_sandbox(sid)


def test_branch_then_fork_from_the_branch(daemon: Daemon, ctl: forkd.Controller, spawned: list[str]) -> None:
    c = daemon.unix()
    sb = Sandbox.create(template=TAG, controller=c, envs={"WHO": "parent"})
    spawned.append(sb.sandbox_id)
    sb.files.write("/root/branch.txt", "from the parent")
    sb.run_code("globalThis.steps = ['warm', 'parent']")
    snap = sb.branch(tag="py-sb-branch")
    assert snap["tag"] == "py-sb-branch" and snap["status"] == "ready" and snap["branched_from"] == sb.sandbox_id
    assert ctl.get_sandbox(sb.sandbox_id)["branch_count"] == 1

    children = Sandbox.fork("py-sb-branch", 2, controller=c)
    spawned.extend(ch.sandbox_id for ch in children)
    assert len({ch.sandbox_id for ch in children}) == 2
    for i, ch in enumerate(children):
        assert ch.files.read("/root/branch.txt") == "from the parent"
        assert ch.run_code(f"steps.push('child{i}'); steps.join(',')").text == f"warm,parent,child{i}"
    # The parent did not see its children's changes.
    assert sb.run_code("steps.length").text == "2"
    # Sandbox-wide envs apply to every command.
    assert sb.commands.run("echo $WHO").stdout == "parent\n"

    # connect() to a running sandbox by id.
    again = Sandbox.connect(children[0].sandbox_id, controller=c)
    assert again.run_code("steps.length").text == "3"
    with pytest.raises(forkd.NotFoundError):
        Sandbox.connect("sb-00000000dead", controller=c)

    for ch in children:
        assert ch.kill() is True
    assert sb.kill() is True
    assert sb.kill() is False
    c.delete_snapshot("py-sb-branch")

