"""Repository references: what a `repoUrl` or `repo` string names, read the same way by the orchestrator, the
sandbox's clone and the github server.

    owner/name, owner/name.git             a GitHub repository on the first of the GitHub hosts
    https://HOST/owner/name[.git][/]       a GitHub repository when HOST is a GitHub host, else any https remote
    /abs/path, file:///abs/path            a repository on this machine (file URLs percent-decoded)

Each caller then says which kinds it takes: the orchestrator GitHub and local ones, the sandbox any of them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

MAX_CHARS = 2048
OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")
NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
FORMS = "owner/name, https://github.com/owner/name, or an absolute path or file:// URL of a local repository"


class RepoError(ValueError):
    """A reference that names no repository we can use; the message says which forms are accepted."""


@dataclass(frozen=True)
class RepoRef:
    kind: Literal["github", "https", "local"]
    host: str = ""  # github and https
    owner: str = ""  # github
    name: str = ""  # github
    url: str = ""  # https: the URL as given, without credentials
    path: Path | None = None  # local

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def clone_url(self) -> str:
        """What git clones: an https URL, or the local path."""
        if self.kind == "github":
            return f"https://{self.host}/{self.full_name}.git"
        return self.url if self.kind == "https" else str(self.path)

    def __str__(self) -> str:
        """The one canonical spelling, which runs and pull requests record."""
        if self.kind == "github":
            return f"https://{self.host}/{self.full_name}"
        return self.url if self.kind == "https" else str(self.path)


def owner_name(text: str) -> tuple[str, str] | None:
    """(owner, name) of `owner/name` (a `.git` suffix dropped), or None."""
    owner, sep, name = text.partition("/")
    name = name[:-4] if name.endswith(".git") else name
    if sep and OWNER.fullmatch(owner) and NAME.fullmatch(name) and name not in (".", ".."):
        return owner, name
    return None


def parse(repo: str, github_hosts: tuple[str, ...] = ("github.com",)) -> RepoRef:
    """What `repo` names; a `RepoError` for anything else."""
    repo = repo.strip()
    if not repo:
        raise RepoError(f"the repository is empty: give {FORMS}")
    if len(repo) > MAX_CHARS or "\x00" in repo:
        raise RepoError(f"the repository reference is over {MAX_CHARS} characters or holds a NUL byte")
    if repo.startswith(("/", "file://")):
        return _local(repo)
    if found := owner_name(repo):
        return RepoRef("github", host=github_hosts[0], owner=found[0], name=found[1])
    parts = urlsplit(repo)
    if parts.scheme != "https" or not parts.hostname:
        raise RepoError(f"{repo[:200]!r} is not a repository reference: give {FORMS}")
    if parts.username is not None or parts.password is not None:
        raise RepoError("the repository URL must not carry credentials; the github server holds the token")
    try:
        port = parts.port
    except ValueError:
        raise RepoError(f"{repo[:200]!r} has an invalid port") from None
    host = parts.hostname.lower()
    if host in github_hosts or (host == "www.github.com" and "github.com" in github_hosts):
        found = owner_name(parts.path.strip("/"))
        if found is None or parts.query or parts.fragment or port is not None:
            raise RepoError(f"{repo[:200]!r} is no GitHub repository: give https://{host}/owner/name")
        return RepoRef("github", host="github.com" if host == "www.github.com" else host, owner=found[0],
                       name=found[1])
    return RepoRef("https", host=host, url=repo)


def _local(repo: str) -> RepoRef:
    if repo.startswith("file://"):
        parts = urlsplit(repo)
        if parts.netloc not in ("", "localhost"):
            raise RepoError(f"{repo[:200]!r} names a file on another host; use a file:///absolute/path URL")
        repo = unquote(parts.path)
    if not repo.startswith("/"):
        raise RepoError(f"{repo[:200]!r} is not an absolute path")
    return RepoRef("local", path=Path(os.path.normpath(repo)))  # `//x`, `/a/./b` and `/a/`, each one way
