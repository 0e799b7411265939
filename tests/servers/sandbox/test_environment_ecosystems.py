"""Real projects of real ecosystems, set up through the egress proxy from a package index served on loopback
(allowlisted for these tests only); then, with no network, their tests run and pass, installing fails, and the
environment is nowhere in the changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fakes.projects import node_project, python_project, python_pyproject_project
from tests.servers.sandbox.helpers import call, sh
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


async def no_changes(tb, sandbox_id: str) -> None:
    changes = await call(tb.client, "export_changes", sandbox_id=sandbox_id)
    assert changes["changeset"]["files"] == [] and changes["changeset"]["deleted"] == [], changes["diff"][:2000]


@pytest.mark.parametrize("make", [python_project, python_pyproject_project])
async def test_a_python_project_installs_through_the_proxy_and_its_tests_pass_offline(
        sandbox_servers, package_index, tmp_path: Path, monkeypatch, make) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", package_index.simple_url)
    tb = await sandbox_servers(setup_allow=package_index.host_port, setup_env=("PIP_INDEX_URL",))
    repo = make(tmp_path / "project", package_index)
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "ready", env
    assert env["source"] == "detected" and env["test_commands"] == ["python -m pytest"]
    assert "tinydep" in " ".join(env["installed"]) and "egress: " in live
    sid = info["sandbox_id"]
    tests = await sh(tb.client, sid, "python -m pytest -q -p no:cacheprovider", timeout_s=120)
    assert tests["exit_code"] == 0 and "passed" in tests["stdout"], tests
    # The agents' edits are what the tests run: the package imports from /workspace.
    await call(tb.client, "exec", sandbox_id=sid, command="python -c 'import calc; print(calc.__file__)'")
    broken = await sh(tb.client, sid, "sed -i 's/return /return -1 + /' calc/__init__.py && "
                                      "python -m pytest -q -p no:cacheprovider")
    assert broken["exit_code"] != 0, broken
    await sh(tb.client, sid, "git checkout -- calc")
    installed = await sh(tb.client, sid, f"pip install --index-url {package_index.simple_url} --timeout 3 "
                                         "--retries 0 tinydep==1.0 --force-reinstall", timeout_s=60)
    assert installed["exit_code"] != 0  # no network in the agent phase, not even to the index
    await no_changes(tb, sid)


async def test_a_node_project_installs_through_the_proxy_and_npm_test_passes_offline(
        sandbox_servers, package_index, tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    tb = await sandbox_servers(setup_allow=package_index.host_port)
    repo = node_project(tmp_path / "project", package_index)
    info, _ = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "ready", env
    assert env["detected"] == ["node (package-lock.json: npm ci)"] and env["test_commands"] == ["npm test"]
    sid = info["sandbox_id"]
    tests = await sh(tb.client, sid, "npm test", timeout_s=120)
    assert tests["exit_code"] == 0, tests
    added = await sh(tb.client, sid, f"npm install --registry {package_index.npm_url} --fetch-retries 0 "
                                     "--fetch-timeout 3000 tiny-dep@1.0.0 --no-save", timeout_s=60)
    assert added["exit_code"] != 0
    assert (await sh(tb.client, sid, "test -e node_modules"))["exit_code"] != 0  # none in the repository
    await no_changes(tb, sid)


async def test_a_setup_that_reaches_a_host_off_the_allowlist_fails_saying_the_proxy_refused(
        sandbox_servers, package_index, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", package_index.simple_url)
    tb = await sandbox_servers(setup_allow="pypi.org", setup_env=("PIP_INDEX_URL",))  # not the loopback index
    repo = python_project(tmp_path / "project", package_index)
    info, live = await tb.call("create_sandbox", repo_url=str(repo))
    env = info["environment"]
    assert env["status"] == "failed", env
    assert "refused" in env["error"] and package_index.host_port.split(":")[0] in env["error"], env["error"]
    assert "not on the setup allowlist" in live or "loopback" in live
    assert package_index.requests == []  # nothing got through
