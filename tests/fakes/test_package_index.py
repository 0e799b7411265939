"""The package index and the sample projects, judged by the real pip and npm on this host (no proxy)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import package_index as index_fakes
from tests.fakes.package_index import PackageIndex
from tests.fakes.projects import node_project, python_project, python_pyproject_project

package_index = index_fakes.package_index  # the fixture, bound here so that pytest finds it for this module

SYSTEM_PYTHON = "/usr/bin/python3"
needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not on PATH")
TINYDEP_WHEEL = "/files/tinydep-1.0-py3-none-any.whl"


def isolated_env(home: Path) -> dict[str, str]:
    """This environment without the host's pip, npm and proxy settings, so the index under test is the only
    source of packages (the host points PIP_FIND_LINKS and its config files elsewhere)."""
    dropped = ("PIP_", "NPM_CONFIG_", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(dropped) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    home.mkdir(exist_ok=True)
    return env | {"HOME": str(home), "PIP_CONFIG_FILE": os.devnull, "NPM_CONFIG_GLOBALCONFIG": os.devnull,
                  "NPM_CONFIG_USERCONFIG": str(home / ".npmrc")}


def run(*args: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def seed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv with the system Python's own pip, made once: ensurepip takes seconds, a copy a fraction."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is not installed")
    path = tmp_path_factory.mktemp("seed") / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(path)], check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture
def venv(seed_venv: Path, tmp_path: Path) -> Path:
    """A fresh venv of /usr/bin/python3 with pip and nothing else installed."""
    return Path(shutil.copytree(seed_venv, tmp_path / "venv", symlinks=True))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return isolated_env(tmp_path / "home")


def pip_install(venv: Path, index_url: str, *args: str, cwd: Path, env: dict[str, str]) -> \
        subprocess.CompletedProcess[str]:
    # --no-compile: compiling pygments to bytecode takes seconds and tells nothing about the index.
    return run(venv / "bin/python", "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
               "--no-cache-dir", "--no-compile", "--index-url", index_url, *args, cwd=cwd, env=env)


def npm(index: PackageIndex, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cache = Path(env["HOME"]) / "npm-cache"
    return run("npm", *args, "--registry", index.npm_url, "--cache", cache, "--no-audit", "--no-fund",
               "--no-update-notifier", cwd=cwd, env=env)


def fetch(url: str, accept: str | None = None, authorization: str | None = None) -> tuple[int, dict, bytes]:
    """Status, headers and body of a GET, redirects not followed."""
    host, _, path = url.removeprefix("http://").partition("/")
    connection = http.client.HTTPConnection(host, timeout=10)
    headers = {k: v for k, v in (("Accept", accept), ("Authorization", authorization)) if v}
    connection.request("GET", "/" + path, headers=headers)
    response = connection.getresponse()
    try:
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_pip_installs_a_requirements_file_from_the_index_and_the_projects_tests_then_pass(
        package_index: PackageIndex, venv: Path, env: dict[str, str], tmp_path: Path) -> None:
    repo = python_project(tmp_path / "calc", package_index)
    assert run(venv / "bin/python", "-m", "pytest", cwd=repo, env=env).returncode != 0

    installed = pip_install(venv, package_index.simple_url, "-r", "requirements.txt", cwd=repo, env=env)

    assert installed.returncode == 0, installed.stdout + installed.stderr
    tested = run(venv / "bin/python", "-m", "pytest", cwd=repo, env=env)
    assert tested.returncode == 0 and "1 passed" in tested.stdout, tested.stdout + tested.stderr
    downloads = [p for p in package_index.requests if p.startswith("/files/")]
    assert TINYDEP_WHEEL in downloads and any(p.startswith("/files/pytest-") for p in downloads)
    assert run("git", "status", "--porcelain", cwd=repo, env=env).stdout == ""  # .gitignore hides what ran


def test_pip_installs_the_pyproject_project_editable_with_its_test_extra_built_by_a_backend_from_the_index(
        package_index: PackageIndex, venv: Path, env: dict[str, str], tmp_path: Path) -> None:
    repo = python_pyproject_project(tmp_path / "calc", package_index)

    installed = pip_install(venv, package_index.simple_url, "-e", ".[test]", cwd=repo, env=env)

    assert installed.returncode == 0, installed.stdout + installed.stderr
    # Run from outside the tree, so that `calc` imports through the install and not from the working directory.
    tested = run(venv / "bin/python", "-m", "pytest", repo / "tests", cwd=tmp_path, env=env)
    assert tested.returncode == 0 and "1 passed" in tested.stdout, tested.stdout + tested.stderr
    where = run(venv / "bin/python", "-c", "import calc; print(calc.__file__)", cwd=tmp_path, env=env)
    assert where.stdout.strip() == str(repo / "calc/__init__.py"), where.stderr  # editable: the tree itself
    assert "/files/tinybuild-1.0-py3-none-any.whl" in package_index.requests
    assert TINYDEP_WHEEL in package_index.requests
    assert run("git", "status", "--porcelain", cwd=repo, env=env).stdout == ""


def test_the_pyproject_project_also_builds_a_regular_wheel_with_the_backend_from_the_index(
        package_index: PackageIndex, env: dict[str, str], tmp_path: Path) -> None:
    repo = python_pyproject_project(tmp_path / "calc", package_index)

    built = run(sys.executable, "-m", "pip", "wheel", "--no-input", "--disable-pip-version-check", "--no-cache-dir",
                "--no-deps", "-w", tmp_path / "wheels", "--index-url", package_index.simple_url, repo,
                cwd=tmp_path, env=env)

    assert built.returncode == 0, built.stdout + built.stderr
    with zipfile.ZipFile(tmp_path / "wheels/calc-0.1.0-py3-none-any.whl") as wheel:
        assert "calc/__init__.py" in wheel.namelist()
        metadata = wheel.read("calc-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Dist: tinydep==1.0" in metadata and 'Requires-Dist: pytest; extra == "test"' in metadata


def test_the_newest_pip_resolves_from_the_core_metadata_beside_each_wheel_before_downloading_it(
        package_index: PackageIndex, env: dict[str, str], tmp_path: Path) -> None:
    package_index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": ""}, requires=["iniconfig>=2"])
    (iniconfig,) = package_index.add_installed("iniconfig")

    downloaded = run(sys.executable, "-m", "pip", "download", "--no-input", "--disable-pip-version-check",
                     "--no-cache-dir", "-d", tmp_path / "wheels", "--index-url", package_index.simple_url,
                     "tinydep", cwd=tmp_path, env=env)

    assert downloaded.returncode == 0, downloaded.stdout + downloaded.stderr
    paths = package_index.requests
    assert paths.index(TINYDEP_WHEEL + ".metadata") < paths.index("/simple/iniconfig/") < paths.index(TINYDEP_WHEEL)
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == [iniconfig, "tinydep-1.0-py3-none-any.whl"]


def test_pip_fails_on_an_unknown_package_as_on_pypi_after_a_404(
        package_index: PackageIndex, venv: Path, env: dict[str, str], tmp_path: Path) -> None:
    installed = pip_install(venv, package_index.simple_url, "nothing-here", cwd=tmp_path, env=env)

    assert installed.returncode != 0
    assert "No matching distribution found for nothing-here" in installed.stderr
    assert fetch(package_index.simple_url + "nothing-here/")[0] == 404
    assert "/simple/nothing-here/" in package_index.requests


def test_with_a_token_a_request_without_it_is_refused_and_pip_with_it_in_the_url_installs(
        venv: Path, env: dict[str, str], tmp_path: Path) -> None:
    with PackageIndex(token="s3cret") as index:
        index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": "def double(x):\n    return 2 * x\n"})
        status, headers, _ = fetch(index.simple_url + "tinydep/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
        basic = "Basic " + base64.b64encode(b"user:wrong").decode()
        assert fetch(index.simple_url + "tinydep/", authorization=basic)[0] == 401
        assert fetch(index.simple_url + "tinydep/", authorization="Bearer s3cret")[0] == 200

        refused = pip_install(venv, index.simple_url, "tinydep", cwd=tmp_path, env=env)
        # pip reports a refused index page only with -v; what shows is that it found nothing to install.
        assert refused.returncode != 0 and "No matching distribution found for tinydep" in refused.stderr
        assert "/simple/tinydep/" in index.requests and TINYDEP_WHEEL not in index.requests
        installed = pip_install(venv, f"http://user:s3cret@{index.host_port}/simple/", "tinydep", cwd=tmp_path,
                                env=env)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert TINYDEP_WHEEL in index.requests


def test_an_unnormalized_name_redirects_to_the_normalized_one_as_pypi_does(package_index: PackageIndex) -> None:
    package_index.add_wheel("Tiny_Dep", "1.0", {"tiny_dep/__init__.py": ""})

    status, headers, _ = fetch(package_index.simple_url + "Tiny.Dep/")
    assert status == 301 and headers["Location"] == "/simple/tiny-dep/"
    assert fetch(package_index.simple_url + "tiny-dep")[1]["Location"] == "/simple/tiny-dep/"
    assert fetch(package_index.simple_url + "Other.Name/")[0] == 404  # no redirect for what is not there
    assert fetch(package_index.simple_url + "tiny-dep/")[0] == 200


def test_the_simple_api_links_each_file_with_its_digest_in_html_and_in_pep_691_json(
        package_index: PackageIndex) -> None:
    package_index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": ""}, requires=["iniconfig>=2"],
                            requires_python=">=3.8")
    status, headers, page = fetch(package_index.simple_url + "tinydep/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    anchor = re.search(r'<a href="([^"#]+)#sha256=([0-9a-f]{64})" data-requires-python="&gt;=3.8"', page.decode())
    wheel = fetch(package_index.url + anchor[1])[2]
    assert hashlib.sha256(wheel).hexdigest() == anchor[2]

    pip_accept = ("application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
                  "text/html; q=0.01")
    status, headers, body = fetch(package_index.simple_url + "tinydep/", accept=pip_accept)
    assert headers["Content-Type"].startswith("application/vnd.pypi.simple.v1+json")
    (file,) = json.loads(body)["files"]
    assert file["hashes"]["sha256"] == anchor[2] and file["requires-python"] == ">=3.8"
    metadata = fetch(package_index.url + file["url"] + ".metadata")[2]
    assert hashlib.sha256(metadata).hexdigest() == file["core-metadata"]["sha256"]
    assert b"Requires-Dist: iniconfig>=2" in metadata
    root = json.loads(fetch(package_index.simple_url, accept="application/vnd.pypi.simple.v1+json")[2])
    assert root["projects"] == [{"name": "tinydep"}]


def test_publishing_a_file_or_version_again_with_other_contents_is_refused(package_index: PackageIndex) -> None:
    package_index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": "A = 1\n"})
    package_index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": "A = 1\n"})  # the same bytes: no change
    with pytest.raises(ValueError, match="already published"):
        package_index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": "A = 2\n"})
    package_index.add_npm("tiny-dep", "1.0.0", {"index.js": "exports.a = 1;\n"})
    with pytest.raises(ValueError, match="already published"):
        package_index.add_npm("tiny-dep", "1.0.0", {"index.js": "exports.a = 2;\n"})


def test_the_npm_registry_answers_packuments_full_or_abbreviated_and_tarballs_matching_their_digests(
        package_index: PackageIndex) -> None:
    package_index.add_npm("@tiny/scoped", "1.0.0", {"index.js": "exports.v = 1;\n"})
    dist = package_index.add_npm("@tiny/scoped", "2.0.0", {"index.js": "exports.v = 2;\n"}, {"tiny-dep": "^1.0.0"})

    status, headers, body = fetch(package_index.npm_url + "@tiny%2fscoped",
                                  accept="application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*")
    abbreviated = json.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/vnd.npm.install-v1+json")
    assert abbreviated["dist-tags"] == {"latest": "2.0.0"} and "time" not in abbreviated
    assert abbreviated["versions"]["2.0.0"] == {"name": "@tiny/scoped", "version": "2.0.0", "dist": dist,
                                                "dependencies": {"tiny-dep": "^1.0.0"}}
    full = json.loads(fetch(package_index.npm_url + "@tiny%2fscoped")[2])
    assert full["_id"] == "@tiny/scoped" and set(full["time"]) >= {"created", "modified", "1.0.0", "2.0.0"}
    assert dist["tarball"] == package_index.npm_url + "@tiny/scoped/-/scoped-2.0.0.tgz"
    tarball = fetch(dist["tarball"])[2]
    assert hashlib.sha1(tarball).hexdigest() == dist["shasum"]
    assert dist["integrity"] == "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    status, _, body = fetch(package_index.npm_url + "nothing-here")
    assert status == 404 and json.loads(body) == {"error": "Not found"}
    assert fetch(package_index.npm_url + "@tiny/scoped/-/scoped-3.0.0.tgz")[0] == 404


async def test_the_index_answers_while_the_tests_event_loop_runs(package_index: PackageIndex) -> None:
    package_index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": ""})
    async with aiohttp.ClientSession() as session, session.get(package_index.simple_url + "tinydep/",
                                                               timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status == 200 and "tinydep-1.0-py3-none-any.whl" in await response.text()


@needs_npm
def test_npm_ci_installs_the_lockfile_from_the_registry_and_npm_test_passes(
        package_index: PackageIndex, env: dict[str, str], tmp_path: Path) -> None:
    repo = node_project(tmp_path / "calc", package_index)
    assert npm(package_index, "test", cwd=repo, env=env).returncode != 0

    installed = npm(package_index, "ci", cwd=repo, env=env)

    assert installed.returncode == 0, installed.stdout + installed.stderr
    tested = npm(package_index, "test", cwd=repo, env=env)
    assert tested.returncode == 0 and "# pass 1" in tested.stdout, tested.stdout + tested.stderr
    assert "/npm/tiny-dep/-/tiny-dep-1.0.0.tgz" in package_index.requests
    assert run("git", "status", "--porcelain", cwd=repo, env=env).stdout == ""


@needs_npm
def test_npm_resolves_a_scoped_package_and_its_dependency_from_the_abbreviated_packuments(
        package_index: PackageIndex, env: dict[str, str], tmp_path: Path) -> None:
    package_index.add_npm("tiny-dep", "1.0.0", {"index.js": "exports.double = (x) => 2 * x;\n"})
    package_index.add_npm("@tiny/scoped", "2.0.0", {"index.js": "module.exports = require('tiny-dep').double;\n"},
                          {"tiny-dep": "^1.0.0"})
    (tmp_path / "app").mkdir()

    installed = npm(package_index, "install", "@tiny/scoped", cwd=tmp_path / "app", env=env)

    assert installed.returncode == 0, installed.stdout + installed.stderr
    used = run("node", "-e", "console.log(require('@tiny/scoped')(21))", cwd=tmp_path / "app", env=env)
    assert used.stdout.strip() == "42", used.stderr
    lock = json.loads((tmp_path / "app/package-lock.json").read_text())
    assert lock["packages"]["node_modules/@tiny/scoped"]["resolved"].startswith(package_index.npm_url)
    assert "/npm/@tiny%2fscoped" in package_index.requests


@needs_npm
def test_npm_fails_on_an_unknown_package_with_the_registrys_404(
        package_index: PackageIndex, env: dict[str, str], tmp_path: Path) -> None:
    viewed = npm(package_index, "view", "nothing-here", cwd=tmp_path, env=env)

    assert viewed.returncode != 0 and "E404" in viewed.stderr, viewed.stderr


@needs_npm
def test_npm_with_the_token_as_auth_token_installs_and_without_it_is_refused(
        env: dict[str, str], tmp_path: Path) -> None:
    with PackageIndex(token="s3cret") as index:
        repo = node_project(tmp_path / "calc", index)
        refused = npm(index, "ci", cwd=repo, env=env)
        assert refused.returncode != 0 and "E401" in refused.stderr, refused.stderr

        Path(env["NPM_CONFIG_USERCONFIG"]).write_text(f"//{index.host_port}/npm/:_authToken=s3cret\n")
        installed = npm(index, "ci", cwd=repo, env=env)

        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert index.requests.count("/npm/tiny-dep/-/tiny-dep-1.0.0.tgz") >= 2  # refused, then served
