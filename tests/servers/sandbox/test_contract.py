"""The sandbox contract, run against every backend and transport (see `sandbox_client` in conftest)."""

from __future__ import annotations

import base64

import anyio

from tests.conftest import git

from .helpers import call, call_error, sandbox, sh


REPO = {
    "README.md": "# demo\n",
    "src/app.py": "def add(a, b):\n    return a - b\n",
    "src/util.py": "VALUE = 1\nVALUE = 1\n",
    ".gitignore": "build/\n*.log\n",
}


async def test_tools_are_listed_with_schemas_and_read_only_hints(sandbox_client):
    tools = {t.name: t for t in (await sandbox_client.list_tools()).tools}
    assert set(tools) == {"create_sandbox", "exec", "read_file", "write_file", "edit_file", "list_files", "search",
                          "export_changes", "destroy_sandbox"}
    for name in ("read_file", "list_files", "search", "export_changes"):
        assert tools[name].annotations.read_only_hint is True, name
    for name in ("exec", "write_file", "edit_file", "destroy_sandbox"):
        assert tools[name].annotations.read_only_hint is False, name
    assert all(t.description for t in tools.values())
    # Text tools answer text alone; every other tool describes its result.
    assert {n for n, t in tools.items() if not t.output_schema} == {"read_file", "edit_file"}
    assert tools["exec"].input_schema["properties"]["timeout_s"]["maximum"] == 600


async def test_create_sandbox_clones_the_repository_at_its_head(sandbox_client, make_repo):
    repo = make_repo(REPO)
    info = await call(sandbox_client, "create_sandbox", repo_url=str(repo))
    assert info["base_commit"] == git(repo, "rev-parse", "HEAD")
    assert info["default_branch"] == "main"
    assert info["sandbox_id"].startswith("sbx_") and len(info["sandbox_id"]) >= 24
    out = await sh(sandbox_client, info["sandbox_id"], "pwd; cat src/app.py; git rev-parse HEAD")
    assert out["exit_code"] == 0
    assert out["stdout"].splitlines()[0] == info["workdir"]
    assert "return a - b" in out["stdout"] and info["base_commit"] in out["stdout"]


async def test_create_sandbox_checks_out_a_ref_and_accepts_file_urls(sandbox_client, make_repo):
    repo = make_repo(REPO)
    first = git(repo, "rev-parse", "HEAD")
    (repo / "README.md").write_text("# second\n")
    git(repo, "commit", "-qam", "second")
    git(repo, "branch", "feature")
    info = await call(sandbox_client, "create_sandbox", repo_url=f"file://{repo}", ref=first)
    assert info["base_commit"] == first
    assert await call(sandbox_client, "read_file", sandbox_id=info["sandbox_id"], path="README.md") == "     1\t# demo"
    info = await call(sandbox_client, "create_sandbox", repo_url=str(repo), ref="feature")
    assert info["base_commit"] == git(repo, "rev-parse", "HEAD")


async def test_create_sandbox_refuses_what_it_cannot_clone(sandbox_client, tmp_path):
    (tmp_path / "plain").mkdir()
    assert "not a git repository" in await call_error(sandbox_client, "create_sandbox", repo_url=str(tmp_path / "plain"))
    assert "absolute" in await call_error(sandbox_client, "create_sandbox", repo_url="relative/path/x")
    assert "ssh" not in await call_error(sandbox_client, "create_sandbox", repo_url="git@github.com:o/r.git")
    msg = await call_error(sandbox_client, "create_sandbox", repo_url="https://user:pw@example.com/o/r.git")
    assert "credentials" in msg and "pw" not in msg
    assert "ref" in await call_error(sandbox_client, "create_sandbox", repo_url=str(tmp_path), ref="--upload-pack=x")


async def test_exec_reports_exit_codes_and_both_streams(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    out = await sh(sandbox_client, sid, "echo out; echo err >&2; exit 3")
    assert out == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "timed_out": False, "truncated": False}
    out = await sh(sandbox_client, sid, "pwd", workdir="src")
    assert out["stdout"].strip().endswith("/src")


async def test_exec_timeout_kills_the_command(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    with anyio.fail_after(20):
        out = await sh(sandbox_client, sid, "echo started; sleep 60; echo never", timeout_s=1)
    assert out["timed_out"] is True and out["exit_code"] == -1
    assert "started" in out["stdout"] and "never" not in out["stdout"]
    assert "timeout" in out["stderr"]


async def test_exec_caps_huge_output_keeping_head_and_tail(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    command = "echo FIRST; head -c 20000000 /dev/zero | tr '\\0' 'x'; echo; echo LAST"
    with anyio.fail_after(60):
        out = await sh(sandbox_client, sid, command)
    assert out["truncated"] is True
    assert len(out["stdout"]) < 31_000
    assert out["stdout"].startswith("FIRST") and out["stdout"].rstrip().endswith("LAST")
    assert "bytes cut" in out["stdout"]


async def test_read_file_numbers_lines_and_pages(sandbox_client, make_repo):
    repo = make_repo({"long.txt": "".join(f"line {i}\n" for i in range(1, 101))})
    sid = await sandbox(sandbox_client, repo)
    text = await call(sandbox_client, "read_file", sandbox_id=sid, path="long.txt", offset=10, limit=3)
    assert text.splitlines()[:3] == ["    10\tline 10", "    11\tline 11", "    12\tline 12"]
    assert "offset=13" in text.splitlines()[-1]
    assert "past the end" in await call_error(sandbox_client, "read_file", sandbox_id=sid, path="long.txt",
                                              offset=500)


async def test_write_then_edit_then_read_round_trips(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    written = await call(sandbox_client, "write_file", sandbox_id=sid, path="pkg/new.py", content="x = 1\ny = 2\n")
    assert written == {"path": "pkg/new.py", "bytes_written": 12}
    diff = await call(sandbox_client, "edit_file", sandbox_id=sid, path="pkg/new.py", old_text="y = 2",
                      new_text="y = 3")
    assert "-y = 2" in diff and "+y = 3" in diff
    assert await call(sandbox_client, "read_file", sandbox_id=sid, path="pkg/new.py") == "     1\tx = 1\n     2\ty = 3"
    out = await sh(sandbox_client, sid, "cat pkg/new.py")
    assert out["stdout"] == "x = 1\ny = 3\n"


async def test_edit_file_refuses_missing_and_ambiguous_text(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    msg = await call_error(sandbox_client, "edit_file", sandbox_id=sid, path="src/util.py", old_text="VALUE = 1",
                           new_text="VALUE = 2")
    assert "2 times" in msg and "replace_all" in msg
    msg = await call_error(sandbox_client, "edit_file", sandbox_id=sid, path="src/util.py", old_text="nope",
                           new_text="x")
    assert "not found" in msg
    await call(sandbox_client, "edit_file", sandbox_id=sid, path="src/util.py", old_text="VALUE = 1",
               new_text="VALUE = 2", replace_all=True)
    assert (await sh(sandbox_client, sid, "cat src/util.py"))["stdout"] == "VALUE = 2\nVALUE = 2\n"


async def test_list_files_leaves_out_git_and_ignored_files(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    await sh(sandbox_client, sid, "mkdir build && touch build/out.o debug.log new.txt")
    listed = await call(sandbox_client, "list_files", sandbox_id=sid)
    assert listed == {"files": [".gitignore", "README.md", "new.txt", "src/app.py", "src/util.py"], "truncated": False}
    assert (await call(sandbox_client, "list_files", sandbox_id=sid, path="src", pattern="*.py"))["files"] == [
        "src/app.py", "src/util.py"]


async def test_search_finds_lines_by_regular_expression(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    found = await call(sandbox_client, "search", sandbox_id=sid, pattern=r"return a \W b")
    assert found == {"matches": ["src/app.py:2:     return a - b"], "truncated": False}
    assert (await call(sandbox_client, "search", sandbox_id=sid, pattern="VALUE", glob="*.md"))["matches"] == []
    assert "invalid" in await call_error(sandbox_client, "search", sandbox_id=sid, pattern="(unclosed")


async def test_export_changes_gives_full_contents_modes_and_deletions(sandbox_client, make_repo):
    repo = make_repo(REPO)
    sid = await sandbox(sandbox_client, repo)
    await call(sandbox_client, "edit_file", sandbox_id=sid, path="src/app.py", old_text="a - b", new_text="a + b")
    await sh(sandbox_client, sid, "rm src/util.py; printf '#!/bin/sh\\necho hi\\n' > run.sh; chmod +x run.sh; "
                                  "mkdir -p build; echo junk > build/x; echo log > a.log")
    changes = await call(sandbox_client, "export_changes", sandbox_id=sid)
    changeset = changes["changeset"]
    assert changeset["base_commit"] == git(repo, "rev-parse", "HEAD")
    assert changeset["deleted"] == ["src/util.py"]
    files = {f["path"]: f for f in changeset["files"]}
    assert set(files) == {"src/app.py", "run.sh"}
    assert base64.b64decode(files["src/app.py"]["content_base64"]).decode() == "def add(a, b):\n    return a + b\n"
    assert files["run.sh"]["mode"] == "100755" and files["src/app.py"]["mode"] == "100644"
    assert "+    return a + b" in changes["diff"] and "deleted file" in changes["diff"]
    # The agent's own staging area is left alone.
    assert (await sh(sandbox_client, sid, "git status --porcelain"))["stdout"].count("??") == 1


async def test_export_changes_of_an_untouched_sandbox_is_empty(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    changes = await call(sandbox_client, "export_changes", sandbox_id=sid)
    assert changes["changeset"]["files"] == [] and changes["changeset"]["deleted"] == [] and changes["diff"] == ""


async def test_destroyed_and_unknown_sandboxes_are_answered_clearly(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    assert await call(sandbox_client, "destroy_sandbox", sandbox_id=sid) == {"sandbox_id": sid, "destroyed": True}
    for tool, extra in [("exec", {"command": "true"}), ("read_file", {"path": "README.md"}),
                        ("destroy_sandbox", {})]:
        msg = await call_error(sandbox_client, tool, sandbox_id=sid, **extra)
        assert "create_sandbox" in msg
    assert "never existed" in await call_error(sandbox_client, "exec", sandbox_id="sbx_guess", command="true")


async def test_paths_outside_the_repository_are_refused(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    for path in ["../outside.txt", "/etc/passwd", "src/../../x", "src/../../../etc/hosts"]:
        for tool, extra in [("read_file", {}), ("write_file", {"content": "x"}),
                            ("edit_file", {"old_text": "a", "new_text": "b"}), ("list_files", {}),
                            ("search", {"pattern": "x"}), ("exec", {"command": "true"})]:
            key = "workdir" if tool == "exec" else "path"
            msg = await call_error(sandbox_client, tool, sandbox_id=sid, **{key: path}, **extra)
            assert "outside the repository" in msg or "absolute" in msg, (tool, path, msg)


async def test_symbolic_links_are_never_followed_by_file_tools(sandbox_client, make_repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret\n")
    sid = await sandbox(sandbox_client, make_repo(REPO))
    await sh(sandbox_client, sid, f"ln -s {outside}/secret.txt link.txt; ln -s {outside} linkdir; "
                                  "ln -s /etc/passwd passwd")
    for path in ("link.txt", "passwd", "linkdir/secret.txt"):
        msg = await call_error(sandbox_client, "read_file", sandbox_id=sid, path=path)
        assert "symbolic link" in msg and "host secret" not in msg
    for path in ("link.txt", "linkdir/planted.txt"):
        assert "symbolic link" in await call_error(sandbox_client, "write_file", sandbox_id=sid, path=path,
                                                   content="pwned")
    assert (outside / "secret.txt").read_text() == "host secret\n"
    assert not (outside / "planted.txt").exists()
    assert "symbolic link" in await call_error(sandbox_client, "list_files", sandbox_id=sid, path="linkdir")


async def test_bad_arguments_get_errors_that_say_what_to_do(sandbox_client, make_repo):
    sid = await sandbox(sandbox_client, make_repo(REPO))
    assert "greater than 0" in await call_error(sandbox_client, "exec", sandbox_id=sid, command="true", timeout_s=-1)
    assert "600" in await call_error(sandbox_client, "exec", sandbox_id=sid, command="true", timeout_s=10**9)
    assert "empty" in await call_error(sandbox_client, "exec", sandbox_id=sid, command="   ")
    assert "5000" in await call_error(sandbox_client, "read_file", sandbox_id=sid, path="README.md", limit=10**9)
    assert "does not exist" in await call_error(sandbox_client, "read_file", sandbox_id=sid, path="missing.py")
    assert "directory" in await call_error(sandbox_client, "read_file", sandbox_id=sid, path="src")
    assert "directory" in await call_error(sandbox_client, "exec", sandbox_id=sid, command="true", workdir="nope")
    assert ".git" in await call_error(sandbox_client, "write_file", sandbox_id=sid, path=".git/config", content="")
    await sh(sandbox_client, sid, "head -c 6000000 /dev/urandom | base64 > big.txt; printf 'a\\0b' > blob.bin")
    assert "MB" in await call_error(sandbox_client, "read_file", sandbox_id=sid, path="big.txt")
    assert "binary" in await call_error(sandbox_client, "read_file", sandbox_id=sid, path="blob.bin")
    # The server is still there for the next call.
    assert (await sh(sandbox_client, sid, "echo alive"))["stdout"] == "alive\n"
