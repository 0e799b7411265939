"""Git objects as GitHub stores them, with real git object ids, so a fake forge answers what GitHub would."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class Commit:
    tree: str
    parents: list[str]
    message: str
    author: str = "Test"
    date: str = "2024-01-01T00:00:00Z"


@dataclass
class ObjectStore:
    """A fork network's shared objects: blobs, trees (one level each) and commits, keyed by their sha1."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    trees: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def add_blob(self, data: bytes) -> str:
        sha = hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()
        self.blobs[sha] = data
        return sha

    def add_tree(self, entries: list[tuple[str, str, str]]) -> str:
        """Store a tree of (mode, name, sha) entries, sorted the way git sorts them."""
        entries = sorted(entries, key=lambda e: e[1] + ("/" if e[0] == "040000" else ""))
        raw = b"".join(f"{mode.lstrip('0')} {name}".encode() + b"\x00" + bytes.fromhex(sha)
                       for mode, name, sha in entries)
        sha = hashlib.sha1(b"tree %d\x00" % len(raw) + raw).hexdigest()
        self.trees[sha] = entries
        return sha

    def add_commit(self, commit: Commit) -> str:
        lines = [f"tree {commit.tree}", *(f"parent {p}" for p in commit.parents),
                 f"author {commit.author} <test@example.com> 1704067200 +0000",
                 f"committer {commit.author} <test@example.com> 1704067200 +0000", "", commit.message]
        raw = "\n".join(lines).encode()
        sha = hashlib.sha1(b"commit %d\x00" % len(raw) + raw).hexdigest()
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
