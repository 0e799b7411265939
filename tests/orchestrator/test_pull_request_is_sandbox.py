"""The pull request is the sandbox: whatever an agent committed on the way, its branch ends holding the sandbox's
final state, and the run's end brings an agent's own pull request up to date with a new commit, never a force push."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import of_type, post_code, stack
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the MCP servers' pool lives on the session's loop

FILES = BUGGY | {"helper.py": "def twice(x):\n    return 2 * x\n"}
FIXED = "def add(a, b):\n    return a + b"
BRANCH = "tb/fix-add"
FIX = tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"})


def commit(message: str) -> dict:
    return tool_use("github_commit_changes", {"branch": BRANCH, "message": message})


OPEN = tool_use("github_open_pull_request", {"head": BRANCH, "title": "Fix add()", "body": "add() adds now."})


def tree(repo, rev: str) -> dict[str, str]:
    """Each file `rev` holds, with its content (less trailing whitespace)."""
    return {p: git(repo, "show", f"{rev}:{p}") for p in git(repo, "ls-tree", "-r", "--name-only", rev).split()}


def run(repo) -> dict:
    return {"repoUrl": str(repo), "prompt": "Fix add(); its test fails.", "mode": "single"}


async def test_a_file_committed_then_deleted_and_a_file_renamed_after_a_commit_leave_the_branch_as_the_sandbox(
        pool, make_repo):
    repo = make_repo(FILES)
    head = git(repo, "rev-parse", "HEAD")
    script = [
        turn(FIX, tool_use("sandbox_write_file", {"path": "notes.txt", "content": "scratch notes\n"})),
        turn(tool_use("github_create_branch", {"branch": BRANCH})),
        turn(commit("Fix add, with notes")),
        turn(tool_use("sandbox_exec", {"command": "rm notes.txt && mv helper.py util.py && "
                                                  "sed -i 's/2 \\* x/x + x/' util.py"})),
        turn(commit("Drop the notes, rename helper.py")),
        turn(OPEN),
        turn(text("Opened the pull request.")),
    ]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, run(repo))
    assert events[-1]["status"] == "success", of_type(events, "error")
    assert not any(r["is_error"] for r in of_type(events, "tool_result"))
    assert tree(repo, BRANCH) == {"calc.py": FIXED, "test_calc.py": BUGGY["test_calc.py"].rstrip(),
                                  "util.py": "def twice(x):\n    return x + x"}
    # The agent's two commits, and none from the run: the branch held the sandbox's state already.
    assert git(repo, "log", "--format=%s", f"{head}..{BRANCH}").splitlines() == [
        "Drop the notes, rename helper.py", "Fix add, with notes"]
    diff = of_type(events, "diff")[0]
    assert (diff["files"], diff["deleted"]) == (["calc.py", "util.py"], ["helper.py"])


async def test_an_edit_after_the_agent_opened_its_pull_request_reaches_it_as_a_new_commit(pool, make_repo):
    repo = make_repo(FILES)
    head = git(repo, "rev-parse", "HEAD")
    script = [
        turn(FIX),
        turn(tool_use("github_create_branch", {"branch": BRANCH})),
        turn(commit("Fix add")),
        turn(OPEN),
        turn(tool_use("sandbox_write_file", {"path": "test_more.py", "content": "from calc import add\n"
                                                                                 "assert add(1, 1) == 2\n"}),
             tool_use("sandbox_exec", {"command": "rm helper.py"})),
        turn(text("Opened the pull request, then added a test.")),
    ]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, run(repo))
    assert events[-1]["status"] == "success", of_type(events, "error")
    assert events[-1]["pull_request_url"] == of_type(events, "pull_request")[0]["url"]
    assert tree(repo, BRANCH) == {"calc.py": FIXED, "test_calc.py": BUGGY["test_calc.py"].rstrip(),
                                  "test_more.py": "from calc import add\nassert add(1, 1) == 2"}
    # On top of the agent's commit, which stays: a new commit, not a force push.
    assert git(repo, "rev-list", "--count", f"{head}..{BRANCH}") == "2"
    assert git(repo, "log", "-1", "--format=%s", f"{BRANCH}^") == "Fix add"
    assert git(repo, "rev-parse", f"{BRANCH}^^") == head
    # What the run showed as its diff is what the pull request holds against the base.
    shown = of_type(events, "diff")[0]["diff"]
    assert shown.strip() == git(repo, "diff", "--no-renames", "--no-color", "--text", head, BRANCH)


async def test_a_pull_request_branch_moved_by_someone_else_is_left_alone_and_the_changes_get_a_draft(pool,
                                                                                                     make_repo):
    repo = make_repo(FILES)
    moved: list[str] = []

    def someone_pushes(_: dict):
        tip = git(repo, "rev-parse", BRANCH)
        moved.append(git(repo, "commit-tree", f"{tip}^{{tree}}", "-p", tip, "-m", "Someone else's commit"))
        git(repo, "update-ref", f"refs/heads/{BRANCH}", moved[0], tip)
        return turn(text("Opened the pull request, then edited the test."))

    script = [
        turn(FIX),
        turn(tool_use("github_create_branch", {"branch": BRANCH})),
        turn(commit("Fix add")),
        turn(OPEN),
        turn(tool_use("sandbox_exec", {"command": "rm helper.py"})),
        someone_pushes,
    ]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, run(repo))
    assert events[-1]["status"] == "error"
    error = of_type(events, "error")[0]
    assert "does not hold the sandbox's final changes" in error["message"] and "moved" in error["message"]
    assert git(repo, "rev-parse", BRANCH) == moved[0] and "helper.py" in tree(repo, BRANCH)
    # Nothing is lost: the sandbox's final state goes to a draft of its own, which says why.
    drafted = of_type(events, "pull_request")[-1]
    assert drafted["draft"] is True and drafted["head"] != BRANCH
    assert events[-1]["pull_request_url"] == drafted["url"] and "helper.py" not in tree(repo, drafted["head"])
    assert "lacks these final changes" in json.loads(Path(drafted["url"].removeprefix("file://")).read_text())["body"]
