"""`list_files` and `search`: ripgrep run where the sandbox's commands run (in its jail, as its user, in its budget),
never on the host, so a link swapped in while ripgrep walks leads nowhere the sandbox could not go itself.

Each backend passes its own way of running a script; the output comes from the sandbox and is parsed strictly.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable

from .base import ExecResult, SandboxError
from .files import MAX_LINE_CHARS, normalize

MAX_LISTED = 2000
MAX_MATCHES = 300
TIMEOUT_S = 60
# Enough for every listed path or match at its longest; `head` stops ripgrep once it has that many.
OUTPUT_CAP = (MAX_LISTED + 1) * 4200
RG = ["rg", "--no-config", "--hidden", "--glob", "!.git", "--no-ignore-parent", "--no-ignore-global",
      "--color", "never", "--no-messages", "--null"]
NO_RG = 127
NL, ESCAPED_NL = "\n", "\\n"
RECORD = re.compile(r"([^\0]*)\0([0-9]+):([^\n]*)\n")

Run = Callable[[str, float, str, int], Awaitable[ExecResult]]  # (script, timeout_s, workdir, output cap)


def _script(args: list[str], take: str) -> str:
    # ripgrep's own exit status decides (1: nothing found, 2: an error); 141 is `head` having had enough.
    return (f"command -v rg >/dev/null || exit {NO_RG}\n"
            f"{shlex.join(RG + args)} -- . | {take}; exit ${{PIPESTATUS[0]}}")


async def _rg(run: Run, path: str, args: list[str], take: str, what: str) -> tuple[str, str]:
    """ripgrep's output in the directory `path`; a `SandboxError` when it failed."""
    rel = normalize(path, allow_root=True)
    result = await run(_script(args, take), TIMEOUT_S, rel, OUTPUT_CAP)
    if result.timed_out:
        raise SandboxError(f"{what} took longer than {TIMEOUT_S} s; narrow the path or the pattern")
    if result.exit_code == NO_RG:
        raise SandboxError("ripgrep is not installed where the sandbox runs: apt-get install ripgrep (or add it "
                           "to the sandbox image)")
    if result.exit_code not in (0, 1, 141) and not result.stdout:
        raise SandboxError(f"{what} failed: {result.stderr.strip()[:500] or f'exit {result.exit_code}'}")
    return rel, result.stdout


def _shown(rel: str, name: str) -> str:
    name = name.removeprefix("./")
    return name if rel == "." else f"{rel}/{name}"


async def list_files(run: Run, path: str, pattern: str | None) -> tuple[list[str], bool]:
    """Files under `path` (not ignored, not under .git), sorted, at most `MAX_LISTED`."""
    args = ["--files"] + (["--glob", pattern] if pattern else [])
    rel, out = await _rg(run, path, args, f"head -z -n {MAX_LISTED + 1}", "list_files")
    names = [n for n in out.split("\0") if n]
    found = sorted(_shown(rel, n) for n in names[:MAX_LISTED])
    return found, len(names) > MAX_LISTED


async def search(run: Run, pattern: str, path: str, glob: str | None) -> tuple[list[str], bool]:
    """Lines matching the regular expression `pattern`, as `path:line: text`."""
    if not pattern:
        raise SandboxError("pattern is empty; give a regular expression such as 'def main'")
    args = ["--line-number", "--max-columns", "300", "--max-columns-preview", "--max-count", str(MAX_MATCHES),
            *(["--glob", glob] if glob else []), "-e", pattern]
    try:
        rel, out = await _rg(run, path, args, f"head -n {MAX_MATCHES + 1}", "search")
    except SandboxError as exc:
        raise SandboxError(str(exc).replace("search failed", "invalid search", 1)) from None
    # Records are `path NUL number : text LF`, read in order: a path may hold a line feed (never a NUL), and the
    # text may hold any other line break, which `str.splitlines` would cut at. A line feed in a path is shown
    # escaped, so that no match reads as another file's.
    matches = [f"{_shown(rel, name).replace(NL, ESCAPED_NL)}:{num}: {text[:MAX_LINE_CHARS]}"
               for name, num, text in RECORD.findall(out)]
    return matches[:MAX_MATCHES], len(matches) > MAX_MATCHES
