"""Git objects as GitHub stores them, with real git object ids, so a fake forge answers what GitHub would."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Commit:
    tree: str
    parents: list[str]
    message: str
    author: str = "Test"
    date: str = "2024-01-01T00:00:00Z"


@dataclass
class ObjectStore:
    """A fork network's shared objects: blobs, trees (one level each) and commits, keyed by their sha1, each kept
    as git stores it too (`raw`: its header and content) so that a real repository can hold them."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    trees: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)

    def _keep(self, kind: bytes, content: bytes) -> str:
        raw = kind + b" %d\x00" % len(content) + content
        sha = hashlib.sha1(raw).hexdigest()
        self.raw[sha] = raw
        return sha

    def add_blob(self, data: bytes) -> str:
        sha = self._keep(b"blob", data)
        self.blobs[sha] = data
        return sha

    def add_tree(self, entries: list[tuple[str, str, str]]) -> str:
        """Store a tree of (mode, name, sha) entries, sorted the way git sorts them."""
        entries = sorted(entries, key=lambda e: e[1] + ("/" if e[0] == "040000" else ""))
        raw = b"".join(f"{mode.lstrip('0')} {name}".encode() + b"\x00" + bytes.fromhex(sha)
                       for mode, name, sha in entries)
        sha = self._keep(b"tree", raw)
        self.trees[sha] = entries
        return sha

    def add_commit(self, commit: Commit) -> str:
        lines = [f"tree {commit.tree}", *(f"parent {p}" for p in commit.parents),
                 f"author {commit.author} <test@example.com> 1704067200 +0000",
                 f"committer {commit.author} <test@example.com> 1704067200 +0000", "", commit.message]
        sha = self._keep(b"commit", "\n".join(lines).encode())
        self.commits[sha] = commit
        return sha

    def flatten(self, tree: str, prefix: str = "") -> dict[str, tuple[str, str]]:
        """Every file under `tree` as path -> (mode, blob sha)."""
        files: dict[str, tuple[str, str]] = {}
        for mode, name, sha in self.trees[tree]:
            if mode == "040000":
                files |= self.flatten(sha, f"{prefix}{name}/")
            else:
                files[f"{prefix}{name}"] = (mode, sha)
        return files

    def build(self, files: dict[str, tuple[str, str]]) -> str:
        """The tree holding `files` (path -> (mode, blob sha)), nested directories included."""
        here: list[tuple[str, str, str]] = []
        subdirs: dict[str, dict[str, tuple[str, str]]] = {}
        for path, (mode, sha) in files.items():
            head, _, rest = path.partition("/")
            if rest:
                subdirs.setdefault(head, {})[rest] = (mode, sha)
            else:
                here.append((mode, head, sha))
        here += [("040000", name, self.build(sub)) for name, sub in subdirs.items()]
        return self.add_tree(here)

    def commit_files(self, files: dict[str, bytes], parents: list[str], message: str) -> str:
        """A commit holding exactly `files` (path -> content)."""
        tree = self.build({path: ("100644", self.add_blob(data)) for path, data in files.items()})
        return self.add_commit(Commit(tree=tree, parents=parents, message=message))

    def is_ancestor(self, ancestor: str, sha: str) -> bool:
        """Whether `ancestor` is `sha` or reachable from it through parents."""
        todo, seen = [sha], set()
        while todo:
            current = todo.pop()
            if current == ancestor:
                return True
            if current in seen or current not in self.commits:
                continue
            seen.add(current)
            todo += self.commits[current].parents
        return False

    def mirror(self, git_dir: Path, refs: dict[str, str], head: str) -> None:
        """Make `git_dir` a bare repository holding every object as a loose object and exactly `refs` (full ref name
        -> sha), its HEAD naming the branch `head`: what `git clone` of it then finds."""
        for sub in ("objects", "refs/heads", "refs/tags"):
            (git_dir / sub).mkdir(parents=True, exist_ok=True)
        _write(git_dir / "config", b"[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n")
        _write(git_dir / "HEAD", f"ref: refs/heads/{head}\n".encode())
        for sha, raw in list(self.raw.items()):
            path = git_dir / "objects" / sha[:2] / sha[2:]
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                _write(path, zlib.compress(raw))
        wanted = {git_dir / name for name in refs}
        for path in sorted((git_dir / "refs").rglob("*"), reverse=True):
            if path.is_file() and path not in wanted:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()) and path.parent != git_dir / "refs":
                path.rmdir()
        for name, sha in refs.items():
            _write(git_dir / name, f"{sha}\n".encode())


def _write(path: Path, data: bytes) -> None:
    """Replace `path` at once, so that a clone reading the repository never sees half a file."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
