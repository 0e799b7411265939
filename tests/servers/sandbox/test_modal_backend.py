"""The Modal backend against autospecs of the real `modal` classes, its setup phase, and `auto`'s fallback to the
local backend."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from unittest.mock import create_autospec

import modal
import pytest
from mcp import StdioServerParameters

from servers.sandbox import modal_env
from servers.sandbox.host import SANDBOX_ENV
from servers.sandbox.manager import Settings
from servers.sandbox.modal_backend import reap_expired
from servers.sandbox.modal_setup import ModalSettings, has_credentials, image
from servers.sandbox.server import build_server
from tests.conftest import git, held_client

from .conftest import ROOT, SECRETS, Watched, free_port, server_env
from .fake_modal import BLOCKED, LocalModal
from .helpers import call, call_error, sandbox, sh

REPO = {"README.md": "# demo\n", "src/app.py": "def add(a, b):\n    return a - b\n", ".gitignore": "*.log\n"}
NO_PROFILE = "/nonexistent/.modal.toml"
HELLO = """mkdir -p /env/bin
printf '#!/bin/sh\\necho hello from the environment\\n' > /env/bin/hello
chmod +x /env/bin/hello
echo 'export PATH=/env/bin:$PATH' >> /env/profile
echo SETUP-RAN
"""
ALLOW = "pypi.org,*.npmjs.org,10.0.0.5:3141,[2001:db8::1]:8080"


@pytest.fixture
def fake(monkeypatch, sandbox_root) -> LocalModal:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    return LocalModal(monkeypatch, sandbox_root / "modal")


@pytest.fixture
async def client(fake, sandbox_root):
    async with held_client(build_server(Settings(backend="modal", root=sandbox_root))) as c:
        yield c


@pytest.fixture
async def servers(fake, sandbox_root):
    """A factory of Modal sandbox servers on one root, each call's live output kept."""
    async with AsyncExitStack() as stack:
        async def start(**settings) -> Watched:
            server = build_server(Settings(backend="modal", root=sandbox_root, **settings))
            return Watched(await stack.enter_async_context(held_client(server)))

        yield start


def no_modal_credentials(monkeypatch) -> None:
    for key in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", NO_PROFILE)


async def test_create_asks_modal_for_a_tagged_sandbox_without_network_or_credentials(client, fake, make_repo):
    repo = make_repo(REPO)
    info = await call(client, "create_sandbox", repo_url=str(repo))
    assert info["backend"] == "modal" and info["workdir"] == "/workspace" and info["note"] is None
    fake.App.lookup.aio.assert_awaited_once_with("tiny-backspace-sandboxes", create_if_missing=True)
    fake.Image.debian_slim.assert_called_once_with(python_version="3.12")
    fake.image.apt_install.assert_called_once_with("git", "ripgrep")
    kwargs = fake.Sandbox.create.aio.call_args.kwargs
    assert kwargs["block_network"] is True and kwargs["app"] is fake.app and kwargs["image"] is fake.image
    assert kwargs["tags"]["sandbox_id"] == info["sandbox_id"] and kwargs["tags"]["app"] == "tiny-backspace"
    assert "secrets" not in kwargs and "env" not in kwargs
    out = await sh(client, info["sandbox_id"], "git rev-parse HEAD; cat src/app.py; env")
    assert info["base_commit"] in out["stdout"] and "return a - b" in out["stdout"]
    assert "ghp_" not in out["stdout"] and "sk-ant" not in out["stdout"]
    assert fake.sandboxes[0].exec.aio.call_args.kwargs["env"] == SANDBOX_ENV


async def test_exec_on_modal_reports_both_streams_and_kills_what_it_leaves_behind(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    out = await sh(client, sid, "echo out; echo err >&2; exit 3")
    assert out == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "timed_out": False, "truncated": False}
    assert (await sh(client, sid, "pwd", workdir="src"))["stdout"].strip().endswith("/src")
    pid = (await sh(client, sid, "sleep 300 >/dev/null 2>&1 & echo $!"))["stdout"].strip()
    # Killed: gone, or a zombie until the container's init reaps it.
    state = await sh(client, sid, f"awk '/^State/ {{print $2}}' /proc/{pid}/status 2>/dev/null || true")
    assert state["stdout"].strip() in ("", "Z")


async def test_exec_on_modal_times_out_and_caps_its_output(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    started = time.monotonic()
    out = await sh(client, sid, "echo started; sleep 60; echo never", timeout_s=1)
    assert time.monotonic() - started < 20
    assert out["timed_out"] is True and out["exit_code"] == -1
    assert "started" in out["stdout"] and "never" not in out["stdout"] and "timeout" in out["stderr"]
    out = await sh(client, sid, "echo FIRST; head -c 2000000 /dev/zero | tr '\\0' x; echo; echo LAST")
    assert out["truncated"] is True and len(out["stdout"]) < 31_000
    assert out["stdout"].startswith("FIRST") and out["stdout"].rstrip().endswith("LAST")


async def test_file_tools_on_modal_round_trip_and_export_reads_the_container(client, make_repo):
    repo = make_repo(REPO)
    sid = await sandbox(client, repo)
    assert await call(client, "write_file", sandbox_id=sid, path="pkg/new.py", content="x = 1\n") == {
        "path": "pkg/new.py", "bytes_written": 6}
    diff = await call(client, "edit_file", sandbox_id=sid, path="src/app.py", old_text="a - b", new_text="a + b")
    assert "+    return a + b" in diff
    assert await call(client, "read_file", sandbox_id=sid, path="src/app.py", offset=2) == "     2\t    return a + b"
    await sh(client, sid, "rm README.md; printf '#!/bin/sh\\n' > run.sh; chmod +x run.sh; echo x > debug.log")
    assert (await call(client, "list_files", sandbox_id=sid))["files"] == [
        ".gitignore", "pkg/new.py", "run.sh", "src/app.py"]
    assert (await call(client, "search", sandbox_id=sid, pattern="a \\+ b"))["matches"] == [
        "src/app.py:2:     return a + b"]
    changes = await call(client, "export_changes", sandbox_id=sid)
    changeset = changes["changeset"]
    assert changeset["base_commit"] == git(repo, "rev-parse", "HEAD") and changeset["deleted"] == ["README.md"]
    files = {f["path"]: f for f in changeset["files"]}
    assert set(files) == {"pkg/new.py", "run.sh", "src/app.py"} and files["run.sh"]["mode"] == "100755"
    assert base64.b64decode(files["src/app.py"]["content_base64"]) == b"def add(a, b):\n    return a + b\n"
    assert "deleted file" in changes["diff"]


async def test_file_tools_on_modal_refuse_paths_outside_links_and_oversized_files(client, fake, make_repo, tmp_path):
    sid = await sandbox(client, make_repo(REPO))
    execs = fake.sandboxes[0].exec.aio
    before = execs.await_count
    for path in ["../x", "/etc/passwd", "src/../../x"]:
        for tool, extra in [("read_file", {}), ("write_file", {"content": "x"}), ("list_files", {}),
                            ("edit_file", {"old_text": "a", "new_text": "b"}), ("search", {"pattern": "x"})]:
            msg = await call_error(client, tool, sandbox_id=sid, path=path, **extra)
            assert "outside the repository" in msg or "absolute" in msg, (tool, path, msg)
    assert execs.await_count == before, "a path outside the repository reached the container"
    (tmp_path / "secret.txt").write_text("host secret\n")
    await sh(client, sid, f"ln -s {tmp_path}/secret.txt link.txt; ln -s {tmp_path} linkdir; "
                          "head -c 6000000 /dev/zero | tr '\\0' x > big.txt")
    for path in ("link.txt", "linkdir/secret.txt"):
        msg = await call_error(client, "read_file", sandbox_id=sid, path=path)
        assert "symbolic link" in msg and "host secret" not in msg
    assert "symbolic link" in await call_error(client, "write_file", sandbox_id=sid, path="link.txt", content="x")
    assert (tmp_path / "secret.txt").read_text() == "host secret\n"
    assert "MB" in await call_error(client, "read_file", sandbox_id=sid, path="big.txt")
    assert ".git" in await call_error(client, "write_file", sandbox_id=sid, path=".git/config", content="")
    assert "directory" in await call_error(client, "exec", sandbox_id=sid, command="true", workdir="linkdir")
    assert "directory" in await call_error(client, "exec", sandbox_id=sid, command="true", workdir="nope")


async def test_a_read_only_command_on_modal_can_read_but_not_change_the_repository(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    out = await sh(client, sid, "cat README.md; git status --short; echo x > README.md; echo ok > /tmp/tb-ro-$$",
                   read_only=True)
    assert "# demo" in out["stdout"] and "Permission denied" in out["stderr"] and out["exit_code"] == 0
    assert (await call(client, "export_changes", sandbox_id=sid))["diff"] == ""


async def test_destroy_terminates_the_modal_sandbox(client, fake, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    await call(client, "destroy_sandbox", sandbox_id=sid)
    assert fake.terminated == ["sb-0"]
    assert "create_sandbox" in await call_error(client, "exec", sandbox_id=sid, command="true")


async def test_a_cold_create_sets_up_in_a_sandbox_of_its_own_and_starts_from_its_snapshot_offline(servers, fake,
                                                                                                    make_repo):
    tb = await servers(setup_allow=ALLOW)
    repo = make_repo({"README.md": "# app\n", ".tb/setup.sh": HELLO + "echo junk > /workspace/junk.txt\n"})
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "ready" and env["source"] == ".tb/setup.sh" and not env["cached"], env
    assert live.count("SETUP-RAN") == 1  # streamed while it ran
    setup, agent = (c.kwargs for c in fake.Sandbox.create.aio.call_args_list)
    # The setup reaches the operator's allowlist and nothing else; the agents' sandbox reaches nothing.
    assert setup["image"] is fake.image and setup["block_network"] is False
    assert setup["outbound_domain_allowlist"] == ["pypi.org", "*.npmjs.org"]
    assert setup["outbound_cidr_allowlist"] == ["10.0.0.5/32", "2001:db8::1/128"]
    assert agent["image"].object_id == "im-snap-0" and agent["block_network"] is True
    assert fake.network("sb-1").network_access_type == BLOCKED
    assert fake.terminated == ["sb-0"]  # the setup sandbox, once snapshotted
    sid = info["sandbox_id"]
    assert (await sh(tb.client, sid, "hello"))["stdout"] == "hello from the environment\n"
    # What the setup did to its copy of the repository and its scratch space is not in the snapshot.
    assert (await sh(tb.client, sid, "ls -A; ls -A /tmp"))["stdout"].split() == [".git", ".tb", "README.md"]
    changes = await call(tb.client, "export_changes", sandbox_id=sid)
    assert changes["changeset"]["files"] == [] and changes["changeset"]["deleted"] == []


async def test_a_second_create_of_the_same_key_starts_from_the_cached_image_without_a_setup(servers, fake,
                                                                                              make_repo):
    tb = await servers()
    repo = make_repo({"package.json": '{"name": "app"}\n', ".tb/setup.sh": HELLO})
    first, _ = await tb.call("create_sandbox", repo_url=str(repo))
    await call(tb.client, "destroy_sandbox", sandbox_id=first["sandbox_id"])
    second, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert second["environment"]["cached"] and "SETUP-RAN" not in live and "from the cache" in live
    assert fake.Sandbox.create.aio.await_count == 3  # setup, first, second
    assert fake.Sandbox.create.aio.call_args.kwargs["image"].object_id == "im-snap-0"
    assert (await sh(tb.client, second["sandbox_id"], "hello"))["exit_code"] == 0
    # Another server on the same root finds the snapshot's id in envs/modal/<key>.json.
    modal_env._SNAPSHOTS.clear()
    third, live = await (await servers()).call("create_sandbox", repo_url=str(repo))
    assert third["environment"]["cached"] and "SETUP-RAN" not in live and list(fake.images) == ["im-snap-0"]
    # Another image is another toolchain, and a changed manifest another environment.
    other, live = await (await servers(modal=ModalSettings(image="python:3.12"))).call(
        "create_sandbox", repo_url=str(repo))
    assert not other["environment"]["cached"] and "SETUP-RAN" in live
    (repo / "package.json").write_text('{"name": "app", "version": "2.0.0"}\n')
    git(repo, "commit", "-qam", "bump")
    fourth, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert not fourth["environment"]["cached"] and "SETUP-RAN" in live and len(fake.images) == 3


async def test_a_cached_image_modal_no_longer_has_is_prepared_again(servers, fake, make_repo):
    tb = await servers()
    repo = make_repo({".tb/setup.sh": HELLO})
    await tb.call("create_sandbox", repo_url=str(repo))
    fake.images.clear()  # past its TTL, or deleted
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert info["environment"]["status"] == "ready" and not info["environment"]["cached"] and "SETUP-RAN" in live
    assert (await sh(tb.client, info["sandbox_id"], "hello"))["exit_code"] == 0


async def test_a_failed_setup_on_modal_is_reported_and_the_sandbox_starts_from_the_base_image(servers, fake,
                                                                                              make_repo):
    tb = await servers()
    repo = make_repo({"app.py": "print(1)\n", ".tb/setup.sh": "echo installing\necho 'no such package' >&2\nexit 3\n"})
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "failed" and "exit 3" in env["error"] and "no such package" in env["error"], env
    assert "installing" in env["output_tail"] and "installing" in live
    assert fake.images == {} and fake.terminated == ["sb-0"]
    agent = fake.Sandbox.create.aio.call_args.kwargs
    assert agent["image"] is fake.image and agent["block_network"] is True
    ran = await sh(tb.client, info["sandbox_id"], "python3 app.py; ls /env")
    assert ran["stdout"].startswith("1") and ran["exit_code"] != 0  # no /env at all


async def test_a_setup_secret_reaches_the_setup_command_alone_and_one_left_in_a_file_fails_the_setup(
        servers, fake, make_repo, monkeypatch):
    token = "idx-" + "k" * 30
    monkeypatch.setenv("PRIVATE_INDEX_TOKEN", token)
    tb = await servers(setup_env=("PRIVATE_INDEX_TOKEN",))
    repo = make_repo({".tb/setup.sh": 'echo "token is $PRIVATE_INDEX_TOKEN"\necho "$PRIVATE_INDEX_TOKEN" > ~/.netrc\n'
                                      'mkdir -p /env/ok\n'})
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    assert info["environment"]["status"] == "ready", info["environment"]
    assert "token is [redacted]" in live and token not in json.dumps(info)
    setup_box, agent_box = fake.sandboxes
    # In the setup sandbox: the setup command's environment, and the forms the check for leftovers looks for.
    given = [c.kwargs["env"] for c in setup_box.exec.aio.call_args_list if token in repr(c)]
    assert [e.get("PRIVATE_INDEX_TOKEN") for e in given] == [token, None] and token in given[1]["TB_FORMS"]
    assert not any(token in " ".join(c.args) for c in setup_box.exec.aio.call_args_list)  # never a command line
    for made in [*fake.Sandbox.create.aio.call_args_list, *agent_box.exec.aio.call_args_list]:
        assert token not in repr(made) and "secrets" not in made.kwargs
    ran = await sh(tb.client, info["sandbox_id"], "env; grep -rs idx- /env /tmp /root /workspace")
    assert token not in ran["stdout"] and ran["exit_code"] != 0
    # Left where the snapshot would keep it, in /env or anywhere else: refused, and nothing is snapshotted.
    for script in ['echo "export T=$PRIVATE_INDEX_TOKEN" >> /env/profile\n',
                   'echo "//registry.npmjs.org/:_authToken=$PRIVATE_INDEX_TOKEN" > /root/.npmrc\n']:
        leaky, _ = await tb.call("create_sandbox", repo_url=str(make_repo({".tb/setup.sh": script})))
        assert leaky["environment"]["status"] == "failed", leaky["environment"]
        assert "PRIVATE_INDEX_TOKEN" in leaky["environment"]["error"] and token not in json.dumps(leaky)
        assert (await sh(tb.client, leaky["sandbox_id"], "ls /env"))["exit_code"] != 0
    assert list(fake.images) == ["im-snap-0"]


async def test_two_creates_of_the_same_key_at_once_run_one_setup_on_modal(servers, fake, make_repo):
    tb = await servers()
    repo = make_repo({".tb/setup.sh": HELLO})
    (a, live_a), (b, live_b) = await asyncio.gather(tb.call("create_sandbox", repo_url=str(repo)),
                                                    tb.call("create_sandbox", repo_url=str(repo)))
    assert (live_a + live_b).count("SETUP-RAN") == 1 and list(fake.images) == ["im-snap-0"]
    assert sorted([a["environment"]["cached"], b["environment"]["cached"]]) == [False, True]
    for info in (a, b):
        assert (await sh(tb.client, info["sandbox_id"], "hello"))["exit_code"] == 0


async def test_the_fake_refuses_what_modal_refuses(fake):
    with pytest.raises(modal.exception.InvalidError, match="cannot be used when `block_network` is enabled"):
        await modal.Sandbox.create.aio(app=fake.app, block_network=True, outbound_domain_allowlist=[])
    with pytest.raises(modal.exception.InvalidError, match="Invalid domain"):
        await modal.Sandbox.create.aio(app=fake.app, outbound_domain_allowlist=["https://pypi.org"])
    with pytest.raises(modal.exception.NotFoundError):
        await modal.Sandbox.create.aio(app=fake.app, image=modal.Image.from_id("im-nonexistent"))
    sandbox = await modal.Sandbox.create.aio(app=fake.app, block_network=True)
    proc = await sandbox.exec.aio("bash", "-c", "echo ${ONLY_HERE:-unset}", env={"ONLY_HERE": "set"}, text=False)
    again = await sandbox.exec.aio("bash", "-c", "echo ${ONLY_HERE:-unset}", text=False)
    assert [b"".join([c async for c in p.stdout]) for p in (proc, again)] == [b"set\n", b"unset\n"]
    await sandbox.terminate.aio()
    with pytest.raises(modal.exception.ConflictError):
        await sandbox.snapshot_filesystem.aio()


async def test_auto_uses_the_local_backend_and_says_why_when_modal_has_no_credentials(monkeypatch, sandbox_root,
                                                                                       make_repo):
    no_modal_credentials(monkeypatch)
    async with held_client(build_server(Settings(root=sandbox_root))) as c:
        info = await call(c, "create_sandbox", repo_url=str(make_repo(REPO)))
    assert info["backend"] == "local"
    assert info["note"] == "Modal unavailable (no credentials): using the local backend"


async def test_explicit_modal_without_credentials_says_how_to_get_them(monkeypatch, sandbox_root, make_repo):
    no_modal_credentials(monkeypatch)
    async with held_client(build_server(Settings(backend="modal", root=sandbox_root))) as c:
        msg = await call_error(c, "create_sandbox", repo_url=str(make_repo(REPO)))
    assert "modal token new" in msg and "SANDBOX_BACKEND=local" in msg


@pytest.mark.parametrize("failure, reason", [
    (modal.exception.AuthError("Token ID is malformed"), "authentication failed: Token ID is malformed"),
    (modal.exception.InternalError("unavailable"), "API error: InternalError: unavailable"),
    (None, "no answer from Modal within 0.2 s"),
])
async def test_auto_falls_back_to_local_when_modal_fails_at_create(fake, sandbox_root, make_repo, failure, reason):
    async def hang(*args, **kwargs):
        await asyncio.Event().wait()  # never set: only the create timeout ends it

    fake.Sandbox.create.aio.side_effect = failure or hang
    settings = Settings(root=sandbox_root, modal=ModalSettings(create_timeout_s=0.2))
    async with held_client(build_server(settings)) as c:
        info = await call(c, "create_sandbox", repo_url=str(make_repo(REPO)))
        assert info["backend"] == "local" and info["note"] == f"Modal unavailable ({reason}): using the local backend"
        assert (await sh(c, info["sandbox_id"], "cat README.md"))["stdout"] == "# demo\n"


async def test_a_sandbox_whose_upload_fails_is_terminated_before_the_fallback(fake, sandbox_root, make_repo):
    async def create(*args, **kwargs):
        broken = fake.sandbox("sb-broken")
        broken.filesystem.copy_from_local.aio.side_effect = modal.exception.SandboxFilesystemError("disk full")
        return broken

    fake.Sandbox.create.aio.side_effect = create
    async with held_client(build_server(Settings(root=sandbox_root))) as c:
        info = await call(c, "create_sandbox", repo_url=str(make_repo(REPO)))
    assert info["backend"] == "local" and "disk full" in info["note"]
    assert fake.terminated == ["sb-broken"]


def unreachable_modal(backend: str, sandbox_root: Path) -> StdioServerParameters:
    """A stdio sandbox server whose Modal token looks valid but whose Modal API is a closed port here."""
    env = server_env(SANDBOX_ROOT=str(sandbox_root), SANDBOX_BACKEND=backend, MODAL_TOKEN_ID="ak-dummy",
                     MODAL_TOKEN_SECRET="as-dummy", MODAL_SERVER_URL=f"http://127.0.0.1:{free_port()}",
                     MODAL_CONFIG_PATH=NO_PROFILE, SANDBOX_MODAL_CREATE_TIMEOUT_S="1")
    return StdioServerParameters(command=sys.executable, args=["-m", "servers.sandbox"], cwd=str(ROOT), env=env)


async def test_auto_falls_back_end_to_end_when_modal_is_unreachable(sandbox_root, make_repo):
    async with held_client(unreachable_modal("auto", sandbox_root)) as c:
        info = await call(c, "create_sandbox", repo_url=str(make_repo(REPO)))
        # The orchestrator streams these fields as the run's `sandbox` event.
        assert info["backend"] == "local"
        assert info["note"] == "Modal unavailable (no answer from Modal within 1 s): using the local backend"
        assert (await sh(c, info["sandbox_id"], "cat README.md"))["stdout"] == "# demo\n"


async def test_explicit_modal_fails_with_a_clear_error_instead_of_falling_back(fake, sandbox_root, make_repo):
    fake.Sandbox.create.aio.side_effect = modal.exception.AuthError("Token ID is malformed")
    async with held_client(build_server(Settings(backend="modal", root=sandbox_root))) as c:
        msg = await call_error(c, "create_sandbox", repo_url=str(make_repo(REPO)))
    assert "Modal is unavailable (authentication failed: Token ID is malformed)" in msg
    assert "SANDBOX_BACKEND=local" in msg
    assert list(sandbox_root.glob("*/sbx-*")) == []


async def test_the_reaper_terminates_only_this_apps_sandboxes_past_their_ttl(fake):
    now = time.time()
    old, young, foreign = fake.sandbox("sb-old"), fake.sandbox("sb-young"), fake.sandbox("sb-foreign")
    old.get_tags.aio.return_value = {"app": "tiny-backspace", "created": str(int(now - 7200)), "ttl_s": "3600"}
    young.get_tags.aio.return_value = {"app": "tiny-backspace", "created": str(int(now - 60)), "ttl_s": "3600"}
    foreign.get_tags.aio.return_value = {"app": "tiny-backspace"}

    async def listed(**kwargs):
        for s in (old, young, foreign):
            yield s

    fake.Sandbox.list.aio.side_effect = listed
    assert await reap_expired(ModalSettings()) == ["sb-old"]
    fake.Sandbox.list.aio.assert_called_once_with(app_id="ap-test", tags={"app": "tiny-backspace"})
    assert fake.terminated == ["sb-old"]


def test_credentials_come_from_the_environment_or_the_active_profile(tmp_path):
    assert has_credentials({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-1", "MODAL_CONFIG_PATH": NO_PROFILE})
    assert not has_credentials({"MODAL_TOKEN_ID": "ak-1", "MODAL_CONFIG_PATH": NO_PROFILE})
    toml = tmp_path / "modal.toml"
    toml.write_text('[default]\ntoken_id = "ak-1"\n[work]\nactive = true\ntoken_id = "ak-2"\ntoken_secret = "as-2"\n')
    assert has_credentials({"MODAL_CONFIG_PATH": str(toml)})
    assert not has_credentials({"MODAL_CONFIG_PATH": str(toml), "MODAL_PROFILE": "default"})
    toml.write_text("not toml [")
    assert not has_credentials({"MODAL_CONFIG_PATH": str(toml)})


def test_settings_default_to_auto_and_read_the_modal_options():
    settings = Settings.from_env({"SANDBOX_MODAL_CREATE_TIMEOUT_S": "5", "SANDBOX_MODAL_IMAGE": "python:3.12",
                                  "SANDBOX_MODAL_CPU": "2", "SANDBOX_MODAL_MEMORY_MIB": "4096"})
    assert settings.backend == "auto"
    assert settings.modal == ModalSettings(create_timeout_s=5, image="python:3.12", cpu=2, memory_mib=4096)
    assert Settings.from_env({"SANDBOX_BACKEND": "modal"}).backend == "modal"
    with pytest.raises(Exception, match="local, process, modal, auto"):
        Settings.from_env({"SANDBOX_BACKEND": "docker"})


def test_the_image_can_be_a_registry_name_or_a_dockerfile(tmp_path, monkeypatch):
    spec = create_autospec(modal.Image)
    monkeypatch.setattr(modal, "Image", spec)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM debian:bookworm-slim\n")
    image(modal, "ghcr.io/acme/sandbox:1")
    spec.from_registry.assert_called_once_with("ghcr.io/acme/sandbox:1")
    image(modal, str(dockerfile))
    spec.from_dockerfile.assert_called_once_with(str(dockerfile))
