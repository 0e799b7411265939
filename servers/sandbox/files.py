"""File tools that run on the host, confined to one repository directory.

Every path is walked one component at a time with `O_NOFOLLOW` from a descriptor of the root, so neither `..` nor
a symbolic link (even one swapped in while we walk) can lead outside it.
"""

from __future__ import annotations

import difflib
import errno
import fnmatch
import os
import posixpath
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import SandboxError

MAX_READ_BYTES = 4 * 1024 * 1024
MAX_WRITE_BYTES = 8 * 1024 * 1024
MAX_READ_LINES = 5000
MAX_LINE_CHARS = 2000
MAX_LISTED = 2000
MAX_MATCHES = 300
SEARCH_TIMEOUT_S = 30

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def normalize(path: str, *, allow_root: bool = False) -> str:
    """The repository-relative form of `path`, or a `SandboxError` saying why it is refused."""
    if "\x00" in path:
        raise SandboxError("path contains a NUL byte")
    if len(path) > 4096:
        raise SandboxError("path is longer than 4096 characters")
    if path.startswith("/"):
        raise SandboxError(
            f"absolute path {path!r} refused: use a path relative to the repository root, e.g. 'src/app.py'"
        )
    clean = posixpath.normpath(path or ".")
    if clean == ".." or clean.startswith("../"):
        raise SandboxError(f"path {path!r} leads outside the repository; use a path inside it")
    if clean == "." and not allow_root:
        raise SandboxError("path is empty: name a file relative to the repository root")
    return clean


@contextmanager
def _open_dir(root: Path, parts: list[str], *, create: bool = False, owner: tuple[int, int] | None = None
              ) -> Iterator[int]:
    """A descriptor of the directory `parts` under `root`, reached without following any link."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for i, name in enumerate(parts):
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise SandboxError(f"directory {'/'.join(parts[:i + 1])!r} does not exist") from None
                os.mkdir(name, 0o755, dir_fd=fd)
                if owner:
                    os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SandboxError(_not_a_plain_dir(fd, name, "/".join(parts[:i + 1]))) from None
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _not_a_plain_dir(dir_fd: int, name: str, shown: str) -> str:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        return f"{shown!r} is a symbolic link (to {target!r}); file tools do not follow links: use the real path"
    return f"{shown!r} is not a directory"


def _split(rel: str) -> tuple[list[str], str]:
    parts = rel.split("/")
    return parts[:-1], parts[-1]


def _open_file(root: Path, rel: str, flags: int, mode: int = 0o644, owner: tuple[int, int] | None = None) -> int:
    dirs, name = _split(rel)
    with _open_dir(root, dirs, create=bool(flags & os.O_CREAT), owner=owner) as dfd:
        try:
            created = False
            if flags & os.O_CREAT:
                try:
                    fd = os.open(name, flags | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
                    created = True
                except FileExistsError:
                    fd = os.open(name, (flags & ~os.O_CREAT) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            else:
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise SandboxError(f"file {rel!r} does not exist; list_files shows what is there") from None
        except IsADirectoryError:
            raise SandboxError(f"{rel!r} is a directory, not a file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SandboxError(_not_a_plain_dir(dfd, name, rel).replace("not a directory", "not a file")) from None
            raise
        if created and owner:
            os.fchown(fd, *owner)
        return fd


def read_bytes(root: Path, rel: str, limit: int = MAX_READ_BYTES) -> bytes:
    """The content of a regular file, refusing links, special files and files over `limit` bytes."""
    fd = _open_file(root, rel, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise SandboxError(f"{rel!r} is a directory; use list_files to see what it holds")
        if not stat.S_ISREG(st.st_mode):
            raise SandboxError(f"{rel!r} is not a regular file")
        if st.st_size > limit:
            raise SandboxError(
                f"{rel!r} is {st.st_size / 1_048_576:.1f} MB, over the {limit // 1_048_576} MB limit: "
                "read parts of it with exec (head, tail, sed -n '100,200p') or find lines with search"
            )
        return f.read(limit + 1)


def read_changed(root: Path, changed: list[tuple[str, str]], limit: int) -> list[bytes]:
    """The new content of each (path, mode) `git diff --raw` listed: a link's target for a link, a regular file's
    bytes otherwise; refused when they add up to more than `limit` bytes."""
    out: list[bytes] = []
    total = 0
    for rel, mode in changed:
        if mode == "120000":
            parent, name = posixpath.split(rel)
            with _open_dir(root, parent.split("/") if parent else []) as dfd:
                data = os.readlink(name, dir_fd=dfd).encode()
        else:
            data = read_bytes(root, rel, limit)
        total += len(data)
        if total > limit:
            raise SandboxError(f"the changes exceed {limit // 1_048_576} MB; remove large generated files or add "
                               "them to .gitignore")
        out.append(data)
    return out


def read_text(root: Path, rel: str, offset: int, limit: int) -> str:
    """Lines `offset`.. of a text file, numbered from 1, with a note when more remain."""
    if offset < 1:
        raise SandboxError("offset is the first line to read, counted from 1")
    if not 1 <= limit <= MAX_READ_LINES:
        raise SandboxError(f"limit must be between 1 and {MAX_READ_LINES} lines; read a long file in pages")
    rel = normalize(rel)
    data = read_bytes(root, rel)
    if b"\x00" in data[:8192]:
        raise SandboxError(f"{rel!r} looks binary; inspect it with exec (file, xxd | head) instead")
    lines = data.decode("utf-8", errors="replace").splitlines()
    if not lines:
        return f"({rel} is empty)"
    if offset > len(lines):
        raise SandboxError(f"offset {offset} is past the end: {rel!r} has {len(lines)} lines")
    end = min(len(lines), offset - 1 + limit)
    out = []
    for n in range(offset, end + 1):
        line = lines[n - 1]
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f" … [{len(line) - MAX_LINE_CHARS} more characters]"
        out.append(f"{n:6}\t{line}")
    if end < len(lines):
        out.append(f"(lines {offset}-{end} of {len(lines)}; call again with offset={end + 1} for more)")
    return "\n".join(out)


def _encode(content: str) -> bytes:
    try:
        data = content.encode("utf-8")
    except UnicodeEncodeError:
        raise SandboxError(
            "content is not valid UTF-8 text; write binary files with exec (for example: echo <base64> | base64 -d > f)"
        ) from None
    if len(data) > MAX_WRITE_BYTES:
        raise SandboxError(f"content is {len(data)} bytes, over the {MAX_WRITE_BYTES} byte limit")
    return data


def _refuse_git_dir(rel: str) -> None:
    if rel == ".git" or rel.startswith(".git/"):
        raise SandboxError("writing inside .git is refused; change the repository's files, not its metadata")


def write_bytes(root: Path, rel: str, data: bytes, owner: tuple[int, int] | None) -> None:
    """Create or replace a regular file (never through a link), creating parent directories."""
    # O_NONBLOCK: a FIFO planted at `rel` fails the open (no reader) instead of blocking this thread for ever.
    try:
        fd = _open_file(root, rel, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, owner=owner)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise SandboxError(f"{rel!r} is not a regular file") from None
        raise
    with os.fdopen(fd, "wb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SandboxError(f"{rel!r} is not a regular file")
        f.truncate(0)
        f.write(data)


def write_text(root: Path, rel: str, content: str, owner: tuple[int, int] | None) -> int:
    rel = normalize(rel)
    _refuse_git_dir(rel)
    data = _encode(content)
    write_bytes(root, rel, data, owner)
    return len(data)


def edit_text(root: Path, rel: str, old_text: str, new_text: str, replace_all: bool,
              owner: tuple[int, int] | None) -> str:
    """Replace `old_text` (exactly once unless `replace_all`) and return a short diff of the edit."""
    rel = normalize(rel)
    _refuse_git_dir(rel)
    if not old_text:
        raise SandboxError("old_text is empty; to create or overwrite a whole file use write_file")
    if old_text == new_text:
        raise SandboxError("old_text and new_text are the same; nothing would change")
    try:
        before = read_bytes(root, rel).decode("utf-8")
    except UnicodeDecodeError:
        raise SandboxError(f"{rel!r} is not UTF-8 text; edit it with exec instead") from None
    count = before.count(old_text)
    if count == 0:
        hint = ""
        if old_text.strip() and before.count(old_text.strip()) > 0:
            hint = " (it does occur without its leading/trailing whitespace)"
        raise SandboxError(
            f"old_text was not found in {rel!r}{hint}; read_file the exact current text and copy it, "
            "whitespace included"
        )
    if count > 1 and not replace_all:
        raise SandboxError(
            f"old_text occurs {count} times in {rel!r}; include more surrounding lines so it occurs once, "
            "or set replace_all to change every occurrence"
        )
    grows = (count if replace_all else 1) * (len(new_text.encode()) - len(old_text.encode()))
    if len(before.encode()) + grows > MAX_WRITE_BYTES:
        raise SandboxError(f"the edit would make {rel!r} larger than the {MAX_WRITE_BYTES} byte limit")
    after = before.replace(old_text, new_text) if replace_all else before.replace(old_text, new_text, 1)
    write_bytes(root, rel, _encode(after), owner)
    diff = "".join(difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{rel}", f"b/{rel}", n=2))
    if len(diff) > 4000:
        diff = diff[:4000] + "\n… [diff cut]"
    return f"replaced {count if replace_all else 1} occurrence(s) in {rel}\n{diff}"


def _rg_argv() -> list[str] | None:
    rg = shutil.which("rg")
    if rg is None:
        return None
    return [rg, "--no-config", "--hidden", "--glob", "!.git", "--no-ignore-parent", "--no-ignore-global",
            "--color", "never", "--no-messages"]


def _rg_lines(root: Path, rel: str, args: list[str], max_lines: int) -> tuple[int, list[str], str]:
    """Run ripgrep in the directory `rel` and read at most `max_lines` lines of its output.

    ripgrep starts in a directory we opened without following links and searches `.`, so a link swapped in after
    our check cannot lead it anywhere else; it never follows links itself.
    """
    with _open_dir(root, [] if rel == "." else rel.split("/")) as dfd:
        proc = subprocess.Popen(args + ["--", "."], cwd=f"/proc/self/fd/{dfd}", pass_fds=(dfd,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})
    timer = threading.Timer(SEARCH_TIMEOUT_S, proc.kill)
    timer.start()
    lines: list[str] = []
    try:
        for raw in proc.stdout:
            lines.append(raw[:MAX_LINE_CHARS].decode("utf-8", "replace").rstrip("\n"))
            if len(lines) > max_lines:
                proc.kill()
                break
        err = proc.stderr.read(4096).decode("utf-8", "replace")
        code = proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
        proc.stderr.close()
    prefix = "" if rel == "." else rel + "/"
    return code, [prefix + ln.removeprefix("./") for ln in lines], err


def check_dir(root: Path, rel: str) -> None:
    if rel != ".":
        with _open_dir(root, rel.split("/")):
            pass


def _glob_match(name: str, glob: str | None) -> bool:
    return not glob or fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(posixpath.basename(name), glob)


def list_paths(root: Path, path: str, pattern: str | None) -> tuple[list[str], bool]:
    """Files under `path` (not ignored, not under .git), sorted, at most `MAX_LISTED`."""
    rel = normalize(path, allow_root=True)
    check_dir(root, rel)
    argv = _rg_argv()
    if argv is not None:
        code, files, err = _rg_lines(root, rel, argv + ["--files"] + (["--glob", pattern] if pattern else []),
                                     MAX_LISTED)
        if code == 2 and err.strip():
            raise SandboxError(f"list_files failed: {err.strip()[:500]}")
    else:
        files = [p for p in _walk(root, rel) if _glob_match(p, pattern)]
    files.sort()
    return files[:MAX_LISTED], len(files) > MAX_LISTED


def search_text(root: Path, pattern: str, path: str, glob: str | None) -> tuple[list[str], bool]:
    """Lines matching the regular expression `pattern`, as `path:line: text`."""
    if not pattern:
        raise SandboxError("pattern is empty; give a regular expression such as 'def main'")
    rel = normalize(path, allow_root=True)
    check_dir(root, rel)
    argv = _rg_argv()
    matches: list[str] = []
    if argv is not None:
        args = argv + ["--line-number", "--null", "--max-columns", "300", "--max-columns-preview",
                       "--max-count", str(MAX_MATCHES)] + (["--glob", glob] if glob else []) + ["-e", pattern]
        code, lines, err = _rg_lines(root, rel, args, MAX_MATCHES)
        if code == 2 and not lines:
            raise SandboxError(f"invalid search: {err.strip()[:500] or 'ripgrep failed'}")
        for line in lines:
            name, _, rest = line.partition("\x00")
            num, _, text = rest.partition(":")
            matches.append(f"{name}:{num}: {text}")
    else:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise SandboxError(f"invalid regular expression: {exc}") from None
        for name in _walk(root, rel):
            if not _glob_match(name, glob):
                continue
            try:
                data = read_bytes(root, name)
            except SandboxError:
                continue
            if b"\x00" in data[:8192]:
                continue
            for n, text in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if rx.search(text):
                    matches.append(f"{name}:{n}: {text[:300]}")
            if len(matches) > MAX_MATCHES:
                break
    return matches[:MAX_MATCHES], len(matches) > MAX_MATCHES


def _walk(root: Path, rel: str) -> list[str]:
    """Files under `rel` without following links, skipping .git and what the top .gitignore names."""
    ignored = _gitignore_patterns(root)
    prefix = "" if rel == "." else rel + "/"
    out = []
    with _open_dir(root, [] if rel == "." else rel.split("/")) as dfd:
        for dirpath, dirnames, filenames, _ in os.fwalk(".", dir_fd=dfd):
            here = prefix + ("" if dirpath == "." else dirpath.removeprefix("./") + "/")
            dirnames[:] = sorted(d for d in dirnames if d != ".git" and not _ignored(here + d, True, ignored))
            out.extend(here + f for f in filenames if not _ignored(here + f, False, ignored))
    return sorted(out)


def _gitignore_patterns(root: Path) -> list[str]:
    try:
        text = read_bytes(root, ".gitignore", 1_048_576).decode("utf-8", "replace")
    except SandboxError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", "!"))]


def _ignored(rel: str, is_dir: bool, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.endswith("/"):
            if not is_dir:
                continue
            pat = pat.rstrip("/")
        anchored = "/" in pat
        pat = pat.lstrip("/")
        if fnmatch.fnmatch(rel, pat) or (not anchored and fnmatch.fnmatch(posixpath.basename(rel), pat)):
            return True
    return False
