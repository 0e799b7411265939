"""The setup phase: an environment prepared once per key, outside the repository, found by every command, reused
from the cache; setups that fail, hang or keep a secret; output that streams while a command runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from servers.sandbox import volume
from servers.sandbox.environment import plan
from tests.conftest import git
from tests.servers.sandbox.helpers import call, sh

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

HELLO = """mkdir -p /env/bin
printf '#!/bin/sh\\necho hello from the environment\\n' > /env/bin/hello
chmod +x /env/bin/hello
echo 'export PATH=/env/bin:$PATH' >> /env/profile
echo SETUP-RAN
"""


def test_the_plan_is_detected_from_manifests_and_a_declared_or_requested_setup_wins() -> None:
    files = {"requirements.txt": b"tinydep==1.0\n", "package.json": b'{"scripts": {"test": "node --test"}}',
             "package-lock.json": b"{}", "go.mod": b"module x\n"}
    found = plan(None, files.get)
    assert found.source == "detected"
    assert found.detected == ["python (requirements.txt)", "node (package-lock.json: npm ci)",
                              "go (go.mod: go mod download)"]
    assert "pip install" in found.script and "-r requirements.txt" in found.script and "npm ci" in found.script
    assert found.test_commands == ["python -m pytest", "npm test", "go test ./..."]
    assert plan("echo mine", files.get).source == "request"
    assert plan("", files.get) is None
    assert plan(None, (files | {".tb/setup.sh": b"echo declared"}).get).script == "echo declared"
    assert plan(None, {"README.md": b"hi"}.get) is None
    extras = plan(None, {"pyproject.toml": b'[project]\nname="x"\n[project.optional-dependencies]\ntest=["pytest"]\n'}
                  .get)
    assert "-e '.[test]'" in extras.script and extras.detected == ["python (pyproject.toml with test)"]


def test_the_key_changes_with_a_lockfile_the_repository_and_the_toolchain() -> None:
    files = {"package.json": b"{}", "package-lock.json": b'{"v": 1}'}
    key = plan(None, files.get).key("repo-a", "node=1")
    assert plan(None, files.get).key("repo-a", "node=1") == key
    assert plan(None, (files | {"package-lock.json": b'{"v": 2}'}).get).key("repo-a", "node=1") != key
    assert plan(None, files.get).key("repo-b", "node=1") != key
    assert plan(None, files.get).key("repo-a", "node=2") != key


async def test_a_declared_setup_prepares_an_environment_every_command_finds_and_nothing_publishes(
        sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    repo = make_repo({"README.md": "# app\n", ".tb/setup.sh": HELLO})
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "ready" and env["source"] == ".tb/setup.sh" and not env["cached"], env
    assert "SETUP-RAN" in live  # the setup's output streamed while it ran
    sid = info["sandbox_id"]
    ran = await sh(tb.client, sid, "hello")
    assert ran["stdout"].strip() == "hello from the environment", ran
    assert (await sh(tb.client, sid, "touch /env/planted"))["exit_code"] != 0  # read-only for the agents
    changes = await call(tb.client, "export_changes", sandbox_id=sid)
    assert changes["changeset"]["files"] == [] and changes["changeset"]["deleted"] == []


async def test_a_second_sandbox_of_the_same_key_starts_from_the_cache_and_a_changed_manifest_does_not(
        sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    repo = make_repo({"package.json": '{"name": "app"}\n', ".tb/setup.sh": HELLO})
    first, _ = await tb.call("create_sandbox", repo_url=str(repo))
    await call(tb.client, "destroy_sandbox", sandbox_id=first["sandbox_id"])
    second, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert second["environment"]["cached"] and "SETUP-RAN" not in live
    assert (await sh(tb.client, second["sandbox_id"], "hello"))["exit_code"] == 0
    # Another server on the same root shares the cache.
    other = await sandbox_servers()
    third, live = await other.call("create_sandbox", repo_url=str(repo))
    assert third["environment"]["cached"] and "SETUP-RAN" not in live
    (repo / "package.json").write_text('{"name": "app", "version": "2.0.0"}\n')
    git(repo, "commit", "-qam", "bump")
    fourth, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert not fourth["environment"]["cached"] and "SETUP-RAN" in live


async def test_setup_works_on_a_copy_so_the_repository_stays_as_cloned(sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    repo = make_repo({"README.md": "# app\n", ".tb/setup.sh": "echo junk > /workspace/junk.txt\n"
                                                             "rm /workspace/README.md\nmkdir -p /env/x\n"})
    info, _ = await tb.call("create_sandbox", repo_url=str(repo))
    assert info["environment"]["status"] == "ready"
    listed = await sh(tb.client, info["sandbox_id"], "ls")
    assert listed["stdout"].split() == ["README.md"]
    changes = await call(tb.client, "export_changes", sandbox_id=info["sandbox_id"])
    assert changes["changeset"]["files"] == [] and changes["changeset"]["deleted"] == []


async def test_a_failed_setup_is_reported_once_and_the_sandbox_still_works(sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    repo = make_repo({"app.py": "print(1)\n", ".tb/setup.sh": "echo installing\necho 'no such package' >&2\nexit 3\n"})
    info, _ = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "failed" and "exit 3" in env["error"] and "no such package" in env["error"], env
    assert "installing" in env["output_tail"]
    ran = await sh(tb.client, info["sandbox_id"], "python3 app.py; ls /env")
    assert ran["stdout"].startswith("1") and ran["exit_code"] != 0  # no /env at all


async def test_a_setup_past_its_limit_fails_saying_which_setting(sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers(setup_timeout_s=1)
    repo = make_repo({".tb/setup.sh": "sleep 60\n"})
    info, _ = await tb.call("create_sandbox", repo_url=str(repo))
    assert info["environment"]["status"] == "failed"
    assert "SANDBOX_SETUP_TIMEOUT_S" in info["environment"]["error"]


async def test_a_requested_setup_wins_and_an_empty_one_means_none(sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    repo = make_repo({".tb/setup.sh": "exit 1\n"})
    info, _ = await tb.call("create_sandbox", repo_url=str(repo), setup=HELLO)
    assert info["environment"]["source"] == "request" and info["environment"]["status"] == "ready"
    none, _ = await tb.call("create_sandbox", repo_url=str(repo), setup="")
    assert none["environment"]["status"] == "none"
    assert (await sh(tb.client, none["sandbox_id"], "hello"))["exit_code"] == 127


async def test_the_agent_phase_has_neither_the_proxy_nor_a_secret_given_to_setup_alone(
        sandbox_servers, make_repo, monkeypatch) -> None:
    token = "idx-" + "k" * 30
    monkeypatch.setenv("PRIVATE_INDEX_TOKEN", token)
    tb = await sandbox_servers(setup_env=("PRIVATE_INDEX_TOKEN",))
    repo = make_repo({".tb/setup.sh": 'echo "token is $PRIVATE_INDEX_TOKEN"\nmkdir -p /env/ok\n'
                                      'test -S /run/tb-egress.sock && echo PROXY-THERE\n'})
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert info["environment"]["status"] == "ready", info["environment"]
    assert "PROXY-THERE" in live and "token is [redacted]" in live and token not in json.dumps(info)
    ran = await sh(tb.client, info["sandbox_id"], "env; test -e /run/tb-egress.sock && echo PROXY-LEFT; "
                                                 "grep -rs idx- /env /tmp")
    assert token not in ran["stdout"] and "PROXY-LEFT" not in ran["stdout"] and "proxy" not in ran["stdout"].lower()
    # A setup that writes the secret where the agents would read it is refused.
    leaky = make_repo({".tb/setup.sh": 'echo "export T=$PRIVATE_INDEX_TOKEN" >> /env/profile\n'})
    info, _ = await tb.call("create_sandbox", repo_url=str(leaky))
    assert info["environment"]["status"] == "failed" and "PRIVATE_INDEX_TOKEN" in info["environment"]["error"]
    assert (await sh(tb.client, info["sandbox_id"], "ls /env"))["exit_code"] != 0


async def test_two_sandboxes_preparing_the_same_key_at_once_run_the_setup_once(sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    repo = make_repo({".tb/setup.sh": HELLO})
    (a, live_a), (b, live_b) = await asyncio.gather(tb.call("create_sandbox", repo_url=str(repo)),
                                                    tb.call("create_sandbox", repo_url=str(repo)))
    assert (live_a + live_b).count("SETUP-RAN") == 1
    assert sorted([a["environment"]["cached"], b["environment"]["cached"]]) == [False, True]
    for info in (a, b):
        assert (await sh(tb.client, info["sandbox_id"], "hello"))["exit_code"] == 0


async def test_the_cache_keeps_its_bound_by_evicting_the_least_recently_used_not_one_in_use(
        sandbox_servers, make_repo, sandbox_root) -> None:
    tb = await sandbox_servers(env_cache_mib=0)  # every new environment evicts the others nobody holds
    first = make_repo({".tb/setup.sh": HELLO})
    held = make_repo({".tb/setup.sh": HELLO + "echo held\n"})
    kept, _ = await tb.call("create_sandbox", repo_url=str(held))
    info, _ = await tb.call("create_sandbox", repo_url=str(first))
    await call(tb.client, "destroy_sandbox", sandbox_id=info["sandbox_id"])
    await tb.call("create_sandbox", repo_url=str(make_repo({".tb/setup.sh": HELLO + "echo third\n"})))
    assert len(list((sandbox_root / "envs").glob("*.json"))) == 2  # the held one and the newest
    again, live = await tb.call("create_sandbox", repo_url=str(first))
    assert not again["environment"]["cached"] and "SETUP-RAN" in live
    assert (await sh(tb.client, kept["sandbox_id"], "hello"))["exit_code"] == 0


async def test_exec_output_streams_while_the_command_is_still_running(sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    info, _ = await tb.call("create_sandbox", repo_url=str(make_repo()))
    sid = info["sandbox_id"]
    seen: list[str] = []
    released = asyncio.Event()

    async def progress(_: float, __: float | None, message: str | None) -> None:
        seen.append(message or "")
        if "first" in "".join(seen) and not released.is_set():
            released.set()
            # The command waits for this file: it can only finish if "first" arrived while it ran.
            await tb.client.call_tool("exec", {"sandbox_id": sid, "command": "touch .go"})

    result = await asyncio.wait_for(tb.client.call_tool(
        "exec", {"sandbox_id": sid, "command": "echo first; while [ ! -e .go ]; do sleep 0.05; done; echo second",
                 "timeout_s": 60}, progress_callback=progress), 60)
    assert not result.is_error and result.structured_content["stdout"].split() == ["first", "second"]
    assert released.is_set() and "second" in "".join(seen)


@pytest.mark.skipif(volume.unavailable() is not None, reason="volumes need root, mkfs.ext4 and loop devices")
async def test_an_image_is_only_checked_once_no_finished_jail_still_holds_its_file_system(tmp_path) -> None:
    """A mount namespace that outlives the unmount (a jail being torn down) keeps the file system alive, and it
    would write its superblock back over a shrink done meanwhile."""
    home = tmp_path / "home"
    home.mkdir()
    point = await volume.make(home, 64)
    holder = subprocess.Popen(["unshare", "-m", "sh", "-c", "read x"], stdin=subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            while not Path(f"/proc/{holder.pid}/ns/mnt").exists() or \
                    os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
                await asyncio.sleep(0.01)
        task = asyncio.create_task(volume.unmount_image(point, home / "volume.img", timeout=30))
        async with asyncio.timeout(30):
            while str(point) in volume.mounts_under(home):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        waited = not task.done()
    finally:
        holder.communicate(b"\n", timeout=30)
    await asyncio.wait_for(task, 30)
    assert waited
    check = subprocess.run(["e2fsck", "-fn", str(home / "volume.img")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
