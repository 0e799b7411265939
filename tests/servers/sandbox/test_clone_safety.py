"""create_sandbox clones a local repository on the host, outside any jail: a hostile source can neither make that
git run a program it names nor pass another repository's objects into the sandbox."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from mcp import Client

from servers.sandbox.manager import Settings
from servers.sandbox.server import build_server
from tests.conftest import git, held_client
from tests.servers.github.hostile import ATTACKS, ATTRIBUTES, BORROWINGS, SECRET, Attack, borrow, git_dir, plant, ran

from .helpers import call, call_error, sandbox


@pytest.fixture
async def client(sandbox_root: Path) -> AsyncIterator[Client]:
    """A sandbox server with the default backend, bubblewrap."""
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as c:
        yield c


def holding(root: Path, text: str) -> list[Path]:
    """Every file under `root` whose bytes contain `text`."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if not path.is_symlink() and text.encode() in path.read_bytes():
                found.append(path)
    return found


@pytest.mark.parametrize("bare", [False, True], ids=["work-tree", "bare"])
@pytest.mark.parametrize("attack", ATTACKS, ids=str)
async def test_cloning_a_source_runs_no_program_it_names(client: Client, make_repo: Callable[..., Path],
                                                         tmp_path: Path, attack: Attack, bare: bool) -> None:
    repo = make_repo({"README.md": "# demo\n", ".gitattributes": ATTRIBUTES, "notes.txt": "notes\n",
                      "a.inc": "included\n"}, bare=bare)
    base = git(repo, "rev-parse", "main")
    marker = plant(repo, attack, tmp_path / "lair")
    for ref in (None, "main", base):
        sid = await sandbox(client, repo, **({"ref": ref} if ref else {}))
        assert "notes" in await call(client, "read_file", sandbox_id=sid, path="notes.txt")
        await call(client, "destroy_sandbox", sandbox_id=sid)
    assert ran(marker) == [], f"host git ran the source's program: {ran(marker)}"


@pytest.mark.parametrize("how", BORROWINGS)
async def test_a_source_borrowing_another_repositorys_objects_is_refused(
        client: Client, make_repo: Callable[..., Path], sandbox_root: Path, how: str) -> None:
    secret = make_repo({"id_rsa": SECRET}, name="secret")
    repo = make_repo({"README.md": "# demo\n"})
    borrow(how, repo, secret)
    if how != "http-alternates":  # its branch is the other repository's commit, which only the borrowing reaches
        (git_dir(repo) / "refs" / "heads" / "main").write_text(git(secret, "rev-parse", "main") + "\n")
    text = await call_error(client, "create_sandbox", repo_url=str(repo))
    assert str(repo) in text and ("borrows objects" in text or "objects directory" in text), text
    assert "git repack -a -d" in text or "give a repository" in text, text
    assert holding(sandbox_root, "not yours") == []
    assert not list(sandbox_root.glob("*/sbx-*"))
