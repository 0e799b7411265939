"""File tools for a sandbox whose files live on another machine: `files` itself, run there by python3.

One implementation of confinement serves every backend: inside the container, as on the host, each path is walked
one component at a time with `O_NOFOLLOW`, so `..` and symbolic links (the container's file system is the truth for
what is a link) are refused with the same messages and limits. The caller normalizes every path here first, so what
leads outside never reaches the remote side at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import files
from .base import SandboxError

# `files` imports `.base` for `SandboxError` only: a stand-in package lets its source run unchanged where neither
# pydantic nor this project is installed.
_BOOT = r'''
import base64, json, os, sys, types
from pathlib import Path

class SandboxError(Exception):
    pass

package = types.ModuleType("tb")
package.__path__ = []
base = types.ModuleType("tb.base")
base.SandboxError = SandboxError
files = types.ModuleType("tb.files")
files.__package__ = "tb"
sys.modules.update({"tb": package, "tb.base": base, "tb.files": files})
exec(compile(SOURCE, "files.py", "exec"), files.__dict__)

request = json.loads(sys.stdin.buffer.read())
op, root, args = request["op"], Path(request["root"]), request["args"]
try:
    if op == "read_changed":
        result = [base64.b64encode(data).decode() for data in
                  files.read_changed(root, [tuple(entry) for entry in args[0]], args[1])]
    else:
        result = getattr(files, op)(root, *args)
    reply = {"ok": result}
except SandboxError as exc:
    reply = {"error": str(exc)}
except OSError as exc:
    reply = {"error": f"{op} failed: {exc.strerror or exc}"}
sys.stdout.write(json.dumps(reply))
'''

RUNNER = f"SOURCE = {Path(files.__file__).read_text()!r}\n{_BOOT}"
OPS = {"read_text", "write_text", "edit_text", "read_changed"}


def request(root: str, op: str, *args: Any) -> bytes:
    """The JSON request that `RUNNER` reads on its stdin."""
    if op not in OPS:
        raise ValueError(f"unknown file operation {op!r}")
    return json.dumps({"op": op, "root": root, "args": list(args)}).encode()


def reply(op: str, out: bytes, err: bytes, code: int) -> Any:
    """The result `RUNNER` printed, or the `SandboxError` it reported; anything else is refused."""
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or len(answer) != 1 or not {"ok", "error"} & set(answer):
        detail = err.decode("utf-8", "replace").strip()[-500:] or "no reply"
        raise SandboxError(f"{op} failed in the sandbox (exit {code}): {detail}")
    if "error" in answer:
        raise SandboxError(str(answer["error"]))
    return answer["ok"]


def shaped(value: Any, kind: str) -> Any:
    """`value` if it has the shape of a `kind` result ("text" or "count"); the reply comes from the sandbox, which
    the agent controls."""
    ok = {
        "text": isinstance(value, str),
        "count": isinstance(value, int) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise SandboxError("the sandbox answered a file tool with a malformed reply")
    return value
