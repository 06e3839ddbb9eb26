"""forkd's warm Python worker.

The agent starts it once at boot, so it is part of every snapshot: a child's
first eval needs no interpreter start and no imports. One JSON request per line
on stdin, one JSON answer per line on the original stdout; code runs with
notebook semantics (statements, then the value of a final expression), and the
namespace persists between calls.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import sys
import time
import traceback

# typing only for the type checker (npm run lint:py, which treats TYPE_CHECKING as true):
# importing it here would cost every guest boot its import time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import CodeType
    from typing import Any, Dict, List, Optional, Tuple

    Compiled = Tuple[CodeType, Optional[CodeType]]

ANSWERS = os.fdopen(os.dup(1), "w", buffering=1)
# User code printing must not corrupt the answer channel.
sys.stdout = io.StringIO()

NAMESPACE: Dict[str, Any] = {"__name__": "__main__"}
WARM = [m for m in os.environ.get("FORKD_PY_IMPORTS", "numpy").split(",") if m]
LOADED: List[str] = []
for module in WARM:
    try:
        NAMESPACE[module] = __import__(module)
        LOADED.append(module)
    except ImportError:
        pass


def to_wire(value: object) -> Tuple[str, str, bool]:
    """The value as JSON text when it is JSON, else its repr (numpy arrays, objects…)."""
    kind = type(value).__name__
    try:
        return json.dumps(value, allow_nan=False), kind, False
    except (TypeError, ValueError):
        return json.dumps(repr(value)), kind, True


COMPILED: Dict[str, Compiled] = {}


def compiled(code: str) -> Compiled:
    # Agents repeat small snippets: parse and compile each distinct one once.
    hit = COMPILED.get(code)
    if hit is not None:
        return hit
    tree = ast.parse(code, filename="<eval>", mode="exec")
    last = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr):
        tree.body.pop()
        last = compile(ast.Expression(final.value), "<eval>", "eval")
    hit = (compile(tree, "<eval>", "exec"), last)
    if len(code) <= 65536:
        if len(COMPILED) >= 128:
            COMPILED.pop(next(iter(COMPILED)))
        COMPILED[code] = hit
    return hit


def run(code: str) -> Tuple[object, str]:
    body, last = compiled(code)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(body, NAMESPACE)
        value = eval(last, NAMESPACE) if last is not None else None
    return value, printed.getvalue()


def answer(message: Dict[str, Any]) -> None:
    ANSWERS.write(json.dumps(message) + "\n")
    ANSWERS.flush()


answer({"ready": True, "imports": LOADED, "python": sys.version.split()[0]})
for line in sys.stdin:
    try:
        request = json.loads(line)
    except ValueError as err:
        answer({"id": None, "ok": False, "error": {"type": "ProtocolError", "message": str(err), "traceback": ""}})
        continue
    started = time.perf_counter()
    try:
        value, printed = run(request.get("code", ""))
        text, kind, is_repr = to_wire(value)
        # The value is spliced in as JSON text: encoded once, not encoded, decoded and encoded again.
        # repr too, as forkd's clients read results (bounded: a huge array's repr is not worth shipping twice).
        shown = text if is_repr else json.dumps(repr(value)[:65536])
        head = json.dumps({"id": request.get("id"), "ok": True, "type": kind, "repr": is_repr, "stdout": printed, "duration_ms": (time.perf_counter() - started) * 1000})
        head = head[:-1] + ', "text": ' + shown + "}"
        ANSWERS.write(head[:-1] + ', "value": ' + text + "}\n")
        ANSWERS.flush()
    except BaseException as err:  # a user's exception, SystemExit included, never ends the worker
        answer(
            {
                "id": request.get("id"),
                "ok": False,
                "error": {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()},
            }
        )
