"""File tools confined to one repository directory: read, write and edit, and the reads of `export_changes`.

The kernel does the confining: every path is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from a
descriptor of the root, so neither `..`, nor a symbolic link, nor one swapped in while we resolve, can lead outside
it. Where `openat2` is missing (Linux before 5.6, some container runtimes), each path is walked one component at a
time with `O_NOFOLLOW` instead. On the host these run as the sandbox's own user (`host.as_user`), never with
privileges the sandbox lacks. This module imports nothing of the project but `.base`: the Modal backend ships it
into its containers as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import SandboxError

MAX_READ_BYTES = 4 * 1024 * 1024
MAX_WRITE_BYTES = 8 * 1024 * 1024
MAX_READ_LINES = 5000
MAX_LINE_CHARS = 2000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYS_OPENAT2 = 437  # the same number on every architecture
# RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_RESOLVE = 0x08 | 0x04 | 0x02 | 0x01


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_has_openat2: bool | None = None


def _openat2(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """`path` opened beneath `dir_fd` without following any link; OSError as from os.open."""
    global _has_openat2
    if _has_openat2 is not False:
        how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _RESOLVE)
        fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            _has_openat2 = True
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM) or _has_openat2:
            if err == errno.EXDEV:  # what openat2 reports for a link out, or a mount point, on the way
                err = errno.ELOOP
            raise OSError(err, os.strerror(err), path)
        _has_openat2 = False  # seccomp filters of some runtimes answer EPERM for syscalls they do not know
    return _walk_open(dir_fd, path, flags, mode)


def _walk_open(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """`_openat2` without openat2: one component at a time, none of them a link."""
    *dirs, name = path.split("/")
    fd = os.dup(dir_fd)
    try:
        for part in dirs:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


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


def _why_refused(root_fd: int, rel: str) -> str:
    """Which component of `rel` is a link or not a directory, for a message the caller can act on.

    Walked one component at a time from descriptors, never by path: a link in the middle, swapped in since the
    open that failed, must not lead even this look elsewhere.
    """
    fd = os.dup(root_fd)
    try:
        parts = rel.split("/")
        for i, name in enumerate(parts):
            shown = "/".join(parts[:i + 1])
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=fd)
                    return (f"{shown!r} is a symbolic link (to {target!r}); file tools do not follow links: use the "
                            "real path")
                if i == len(parts) - 1:
                    break
                if not stat.S_ISDIR(st.st_mode):
                    return f"{shown!r} is not a directory"
                nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                break
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    return f"{rel!r} could not be opened without leaving the repository"


@contextmanager
def _open_dir(root: Path, rel: str, *, create: bool = False) -> Iterator[int]:
    """A descriptor of the directory `rel` under `root`, reached without following any link; created when asked."""
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        if rel == ".":
            fd = os.dup(root_fd)
        else:
            fd = _open_beneath_dir(root_fd, rel, create)
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_beneath_dir(root_fd: int, rel: str, create: bool) -> int:
    try:
        return _openat2(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        if not create:
            raise SandboxError(f"directory {rel!r} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SandboxError(_why_refused(root_fd, rel)) from None
        raise
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(rel.split("/")):
            try:
                try:
                    nxt = _openat2(fd, part, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)  # one component: nothing on the way to follow
                    nxt = _openat2(fd, part, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SandboxError(_why_refused(root_fd, "/".join(rel.split("/")[:i + 1]))) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_dir(root: Path, rel: str) -> None:
    """Refuse a `rel` that is not a directory of the repository reached without links."""
    with _open_dir(root, rel):
        pass


def _open_file(root: Path, rel: str, flags: int, mode: int = 0o644) -> int:
    parent, name = posixpath.split(rel)
    with _open_dir(root, parent or ".", create=bool(flags & os.O_CREAT)) as dfd:
        try:
            return _openat2(dfd, name, flags, mode)
        except FileNotFoundError:
            raise SandboxError(f"file {rel!r} does not exist; list_files shows what is there") from None
        except IsADirectoryError:
            raise SandboxError(f"{rel!r} is a directory, not a file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SandboxError(_why_refused(dfd, name).replace(repr(name), repr(rel), 1)) from None
            raise


class Larger(Exception):
    """The file is over the size its caller would read here; read it where waiting costs no one else."""


def read_bytes(root: Path, rel: str, limit: int = MAX_READ_BYTES, here_max: int | None = None) -> bytes:
    """The content of a regular file, refusing links, special files and files over `limit` bytes; `Larger` when
    it is over `here_max`."""
    fd = _open_file(root, rel, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise SandboxError(f"{rel!r} is a directory; use list_files to see what it holds")
        if not stat.S_ISREG(st.st_mode):
            raise SandboxError(f"{rel!r} is not a regular file")
        if here_max is not None and st.st_size > here_max:
            raise Larger(rel)
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
            with _open_dir(root, parent or ".") as dfd:
                data = os.readlink(name, dir_fd=dfd).encode()
        else:
            data = read_bytes(root, rel, limit)
        total += len(data)
        if total > limit:
            raise SandboxError(f"the changes exceed {limit // 1_048_576} MB; remove large generated files or add "
                               "them to .gitignore")
        out.append(data)
    return out


def _lines(text: str, keepends: bool = False) -> list[str]:
    """`text` cut at each "\n" and nowhere else, as ripgrep, sed and git number lines; `str.splitlines()` also cuts
    at "\r", form feeds, U+0085 and U+2028, which would shift every later line number against theirs."""
    lines = text.split("\n")
    tail = lines.pop()  # after the last "\n": a last line that lacks one, or nothing
    if keepends:
        lines = [line + "\n" for line in lines]
    return lines + [tail] if tail else lines


def read_text(root: Path, rel: str, offset: int, limit: int, here_max: int | None = None) -> str:
    """Lines `offset`.. of a text file, numbered from 1, with a note when more remain; `Larger` when the file is over
    `here_max` bytes."""
    if offset < 1:
        raise SandboxError("offset is the first line to read, counted from 1")
    if not 1 <= limit <= MAX_READ_LINES:
        raise SandboxError(f"limit must be between 1 and {MAX_READ_LINES} lines; read a long file in pages")
    rel = normalize(rel)
    data = read_bytes(root, rel, here_max=here_max)
    if b"\x00" in data[:8192]:
        raise SandboxError(f"{rel!r} looks binary; inspect it with exec (file, xxd | head) instead")
    lines = _lines(data.decode("utf-8", errors="replace"))
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


def write_bytes(root: Path, rel: str, data: bytes) -> None:
    """Create or replace a regular file (never through a link), creating parent directories."""
    # O_NONBLOCK: a FIFO planted at `rel` fails the open (no reader) instead of blocking this thread for ever.
    try:
        fd = _open_file(root, rel, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise SandboxError(f"{rel!r} is not a regular file") from None
        raise
    with os.fdopen(fd, "wb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SandboxError(f"{rel!r} is not a regular file")
        f.truncate(0)
        f.write(data)


def write_text(root: Path, rel: str, content: str) -> int:
    rel = normalize(rel)
    _refuse_git_dir(rel)
    data = _encode(content)
    write_bytes(root, rel, data)
    return len(data)


def edit_text(root: Path, rel: str, old_text: str, new_text: str, replace_all: bool) -> str:
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
    write_bytes(root, rel, _encode(after))
    diff = "".join(difflib.unified_diff(
        _lines(before, keepends=True), _lines(after, keepends=True), f"a/{rel}", f"b/{rel}", n=2))
    if len(diff) > 4000:
        diff = diff[:4000] + "\n… [diff cut]"
    return f"replaced {count if replace_all else 1} occurrence(s) in {rel}\n{diff}"
