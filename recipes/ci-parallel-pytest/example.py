"""ci-parallel-pytest with forkd's Python SDK (sdk/python): the same measurement
as example.ts. Run: PYTHONPATH=sdk/python python3 recipes/ci-parallel-pytest/example.py [N]
with a daemon reachable (FORKD_URL, or the local socket)."""
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from forkd import Controller

TAG = "ci-parallel-pytest"
PYTEST = "cd /opt/recipe/project && python3 -m pytest -q -p no:cacheprovider"


def passed(result):
    match = re.search(r"(\d+) passed", result["stdout"])
    return int(match.group(1)) if match else 0


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    controller = Controller(timeout=900)
    ids = []
    try:
        started = time.monotonic()
        [one] = controller.spawn_sandboxes(TAG, 1)
        ids.append(one["id"])
        serial_passed = passed(controller.exec_command(one["id"], PYTEST, timeout_secs=900))
        serial_s = time.monotonic() - started

        started = time.monotonic()
        forks = controller.spawn_sandboxes(TAG, n)
        ids.extend(child["id"] for child in forks)
        with ThreadPoolExecutor(max_workers=n) as pool:
            counts = list(
                pool.map(
                    lambda item: passed(controller.exec_command(item[1]["id"], f"{PYTEST} --shard {item[0]}/{n}", timeout_secs=900)),
                    enumerate(forks),
                )
            )
        parallel_s = time.monotonic() - started
        if sum(counts) != serial_passed:
            raise SystemExit(f"the shards passed {sum(counts)} tests, the serial run {serial_passed}")
        print(json.dumps({"tests": serial_passed, "forks": n, "serial_s": round(serial_s, 1),
                          "parallel_s": round(parallel_s, 1), "ratio": round(serial_s / parallel_s, 2)}))
    finally:
        for sandbox_id in ids:
            try:
                controller.kill_sandbox(sandbox_id)
            except Exception:  # already gone: nothing to clean up
                pass


if __name__ == "__main__":
    main()
