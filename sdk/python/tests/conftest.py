"""A real forkd daemon, with real VMs, for the Python SDK's tests.

One daemon per test session, started with the repository's CLI in a private
FORKD_HOME / FORKD_RUN_DIR / FORKD_SHM_DIR (the slow-to-build guest images are
shared by linking the real images dir in, as the JS tests do), listening on a
unix socket and on a free loopback port with a token. A warm snapshot is made
through the SDK itself. Everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

SDK_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = SDK_DIR.parents[1]
CLI = REPO_ROOT / "packages" / "cli" / "dist" / "main.js"

sys.path.insert(0, str(SDK_DIR))

import forkd  # noqa: E402

#: The warm snapshot every test forks from (JavaScript runtime, `answer` defined while warming).
TAG = "py-warm"
SNAPSHOT_MEMORY_MIB = 128


@dataclass
class Daemon:
    root: Path
    home: Path
    run_dir: Path
    shm_dir: Path
    socket: str
    url: str
    token: str
    env: Dict[str, str]
    proc: "subprocess.Popen[bytes]"
    stderr_lines: List[str] = field(default_factory=list)

    @property
    def unix_url(self) -> str:
        return f"unix:{self.socket}"

    def tcp(self, timeout: float = 60.0) -> forkd.Controller:
        return forkd.Controller(base_url=self.url, token=self.token, timeout=timeout)

    def unix(self, timeout: float = 60.0) -> forkd.Controller:
        return forkd.Controller(base_url=self.unix_url, timeout=timeout)

    def stderr(self) -> str:
        return "".join(self.stderr_lines)


def _node() -> str:
    node = os.environ.get("NODE") or shutil.which("node")
    if not node:
        pytest.fail("node is not on PATH; the daemon under test is the repository's CLI (packages/cli/dist/main.js)")
    return node


def _start(root: Path) -> Daemon:
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: run `npm run build` first")
    home, run_dir = root / "home", root / "run"
    home.mkdir()
    run_dir.mkdir()
    real_images = Path(os.environ.get("FORKD_HOME") or "/var/lib/forkd") / "images"
    if real_images.exists():
        (home / "images").symlink_to(real_images)
    shm_dir = Path(tempfile.mkdtemp(prefix="forkd-pytest-", dir="/dev/shm"))
    token = secrets.token_urlsafe(24)
    token_file = root / "token.txt"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    sock = str(root / "forkd.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("FORKD_URL", "FORKD_TOKEN", "FORKD_SOCKET")}
    env.update(FORKD_HOME=str(home), FORKD_RUN_DIR=str(run_dir), FORKD_SHM_DIR=str(shm_dir))
    argv = [
        _node(),
        str(CLI),
        "daemon",
        "--socket",
        sock,
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        str(token_file),
        "--audit-log",
        str(root / "audit.log"),
    ]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: List[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            lines.append(raw.decode("utf-8", errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", "".join(lines))
        if m:
            return Daemon(root, home, run_dir, shm_dir, sock, f"http://127.0.0.1:{m.group(1)}", token, env, proc, lines)
        if proc.poll() is not None:
            time.sleep(0.2)
            pytest.fail(f"the daemon exited with {proc.returncode}: {''.join(lines)}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the daemon did not start within 90 s: {''.join(lines)}")


def _qemu_pids_under(root: Path) -> List[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and str(root) in cmdline:
            pids.append(int(entry))
    return pids


def _stop(d: Daemon) -> None:
    try:
        for sb in d.unix(timeout=30).list_sandboxes():
            try:
                d.unix(timeout=30).kill_sandbox(sb["id"])
            except forkd.ControllerError:
                pass
    except Exception:  # the daemon may be gone already; the steps below still clean up
        pass
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(timeout=10)
    # Only VMMs under this session's own dirs: ours, whatever the daemon left behind.
    for pid in _qemu_pids_under(d.root) + _qemu_pids_under(d.shm_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run([_node(), str(CLI), "cleanup", "-y", "--json"], env=d.env, capture_output=True, timeout=120)
    state = d.run_dir / "netns.json"
    if state.exists():
        try:
            ns = json.loads(state.read_text())
        except ValueError:
            ns = {}
        for argv in (
            ["ip", "netns", "delete", str(ns.get("netns", ""))],
            ["ip", "link", "delete", str(ns.get("hostVeth", ""))],
            ["nft", "delete", "table", "inet", str(ns.get("hostTable", ""))],
        ):
            if argv[-1]:
                subprocess.run(argv, capture_output=True, timeout=30)
    shutil.rmtree(d.shm_dir, ignore_errors=True)
    shutil.rmtree(d.root, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    # Short: the unix socket's path must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="fkpy-", dir=os.environ.get("FORKD_TEST_ROOT") or "/tmp"))
    d = _start(root)
    try:
        snap = d.unix(timeout=600).create_snapshot(
            TAG, image="base", warm_eval=["globalThis.answer = 41"], memory_mib=SNAPSHOT_MEMORY_MIB
        )
        assert snap["tag"] == TAG and snap["status"] == "ready", snap
        yield d
    finally:
        _stop(d)


@pytest.fixture
def ctl(daemon: Daemon) -> forkd.Controller:
    """The daemon over TCP, with its token."""
    return daemon.tcp()


@pytest.fixture
def spawned(daemon: Daemon) -> Iterator[List[str]]:
    """Ids appended here are killed after the test, whatever happened in it."""
    ids: List[str] = []
    yield ids
    c = daemon.unix(timeout=60)
    for sandbox_id in ids:
        try:
            c.kill_sandbox(sandbox_id)
        except forkd.NotFoundError:
            pass
