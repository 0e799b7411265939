"""Small real projects, committed to git, whose dependencies come from a `PackageIndex`.

Each function publishes what its project needs to the index and returns the repository: the tests pass once
the dependencies are installed from the index (pip or npm, offline), and fail to import them before.

    repo = python_project(tmp_path / "calc", package_index)   # requirements.txt: tinydep==1.0, pytest
    repo = python_pyproject_project(tmp_path / "calc", package_index)   # pip install -e '.[test]'
    repo = node_project(tmp_path / "calc", package_index)   # npm ci; npm test
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.fakes.package_index import PackageIndex

GIT_IDENTITY = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com",
                "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z"}
# What pytest and its requirements need on Python 3.11 (no tomli, exceptiongroup or colorama there).
PYTEST = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")

CALC = "from tinydep import double\n\n\ndef quadruple(x):\n    return double(double(x))\n"
TEST_CALC = ("from calc import quadruple\n\n\n"
             "def test_quadruple_doubles_twice():\n    assert quadruple(3) == 12\n")
PYTHON_GITIGNORE = "__pycache__/\n*.pyc\n*.egg-info/\n.pytest_cache/\n.venv/\nbuild/\ndist/\n"

# A build backend for a project holding one import package named after it. The index serves it as a wheel, so
# pip's isolated build fetches it from there as it would fetch setuptools: this machine has no wheel of a real
# backend to repack (.venv's setuptools 65 also needs `wheel`, which nothing here has installed from a wheel).
BACKEND = '''"""PEP 517 and PEP 660 hooks for a project holding one import package named after it."""

import base64
import hashlib
import io
import os
import re
import tarfile
import tomllib
import zipfile
from pathlib import Path

WHEEL = "Wheel-Version: 1.0\\nGenerator: tinybuild\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"


def _project():
    return tomllib.loads(Path("pyproject.toml").read_text())["project"]


def _stem(project):
    return re.sub(r"[-_.]+", "_", project["name"]).lower() + "-" + project["version"]


def _metadata(project):
    lines = ["Metadata-Version: 2.1", "Name: " + project["name"], "Version: " + project["version"]]
    if "requires-python" in project:
        lines.append("Requires-Python: " + project["requires-python"])
    lines += ["Requires-Dist: " + r for r in project.get("dependencies", [])]
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines.append("Provides-Extra: " + extra)
        for r in requirements:
            name, _, marker = r.partition(";")
            extra_marker = 'extra == "%s"' % extra
            lines.append("Requires-Dist: %s; %s" % (name.strip(), "(%s) and %s" % (marker, extra_marker)
                                                    if marker else extra_marker))
    return "\\n".join(lines) + "\\n"


def _sources(project):
    package = Path(re.sub(r"[-_.]+", "_", project["name"]).lower())
    return {p.as_posix(): p.read_bytes() for p in sorted(package.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _wheel(directory, files):
    project = _project()
    info = _stem(project) + ".dist-info"
    files = {**files, info + "/METADATA": _metadata(project).encode(), info + "/WHEEL": WHEEL.encode()}
    record = ["%s,sha256=%s,%d" % (path, base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                                   .decode(), len(data)) for path, data in files.items()]
    files[info + "/RECORD"] = ("\\n".join(record + [info + "/RECORD,,"]) + "\\n").encode()
    filename = _stem(project) + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, filename), "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return filename


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, _sources(_project()))


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # A .pth line puts the source tree itself on sys.path, so edits count without reinstalling.
    return _wheel(wheel_directory, {"_%s_editable.pth" % _stem(_project()): (os.getcwd() + "\\n").encode()})


def build_sdist(sdist_directory, config_settings=None):
    project = _project()
    files = {"pyproject.toml": Path("pyproject.toml").read_bytes(), "PKG-INFO": _metadata(project).encode(),
             **_sources(project)}
    with tarfile.open(os.path.join(sdist_directory, _stem(project) + ".tar.gz"), "w:gz") as archive:
        for path, data in files.items():
            entry = tarfile.TarInfo(_stem(project) + "/" + path)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return _stem(project) + ".tar.gz"
'''

PYPROJECT = """[build-system]
requires = ["tinybuild==1.0"]
build-backend = "tinybuild"

[project]
name = "calc"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["tinydep==1.0"]

[project.optional-dependencies]
test = ["pytest"]
"""

TINY_DEP = "exports.double = (x) => 2 * x;\n"
NODE_CALC = "const { double } = require('tiny-dep');\n\nexports.quadruple = (x) => double(double(x));\n"
NODE_TEST = ("const test = require('node:test');\nconst assert = require('node:assert');\n"
             "const { quadruple } = require('..');\n\n"
             "test('quadruple doubles twice', () => {\n  assert.strictEqual(quadruple(3), 12);\n});\n")


def commit(path: Path, files: dict[str, str], message: str = "initial commit") -> Path:
    """A git repository at `path` on branch `main` holding `files` in one commit by a fixed author and date."""
    path.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", message]):
        subprocess.run(["git", *args], cwd=path, env=os.environ | GIT_IDENTITY, check=True, capture_output=True)
    return path


def publish_tinydep(index: PackageIndex) -> None:
    """Publish `tinydep` 1.0 (`double`) and pytest with what it requires."""
    index.add_wheel("tinydep", "1.0", {"tinydep/__init__.py": "def double(x):\n    return 2 * x\n"},
                    requires_python=">=3.8")
    index.add_installed(*PYTEST)


def python_project(path: Path, index: PackageIndex) -> Path:
    """A package `calc` needing `tinydep` from the index, installed with `pip install -r requirements.txt`."""
    publish_tinydep(index)
    return commit(path, {"calc/__init__.py": CALC, "tests/test_calc.py": TEST_CALC,
                         "requirements.txt": "tinydep==1.0\npytest\n", ".gitignore": PYTHON_GITIGNORE})


def python_pyproject_project(path: Path, index: PackageIndex) -> Path:
    """The same package declared in pyproject.toml, installed with `pip install -e '.[test]'`; its build
    backend, `tinybuild`, is on the index too."""
    publish_tinydep(index)
    index.add_wheel("tinybuild", "1.0", {"tinybuild/__init__.py": BACKEND}, requires_python=">=3.11")
    return commit(path, {"calc/__init__.py": CALC, "tests/test_calc.py": TEST_CALC, "pyproject.toml": PYPROJECT,
                         ".gitignore": PYTHON_GITIGNORE})


def node_project(path: Path, index: PackageIndex) -> Path:
    """A package needing `tiny-dep` from the index, with the lockfile `npm ci` installs from; `npm test` runs
    its `node:test` suite."""
    dist = index.add_npm("tiny-dep", "1.0.0", {"index.js": TINY_DEP})
    dependencies = {"tiny-dep": "^1.0.0"}
    package = {"name": "calc", "version": "1.0.0", "private": True, "main": "index.js",
               "scripts": {"test": "node --test"}, "dependencies": dependencies}
    lock = {"name": "calc", "version": "1.0.0", "lockfileVersion": 3, "requires": True,
            "packages": {"": {"name": "calc", "version": "1.0.0", "dependencies": dependencies},
                         "node_modules/tiny-dep": {"version": "1.0.0", "resolved": dist["tarball"],
                                                   "integrity": dist["integrity"]}}}
    return commit(path, {"package.json": json.dumps(package, indent=2) + "\n",
                         "package-lock.json": json.dumps(lock, indent=2) + "\n", "index.js": NODE_CALC,
                         "test/calc.test.js": NODE_TEST, ".gitignore": "node_modules/\n"})
