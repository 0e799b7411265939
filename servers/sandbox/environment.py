"""What a sandbox's setup phase runs: the script a request or the repository declares, or one detected from its
manifests, and the key that decides when a prepared environment can be reused.

Everything a setup installs goes under `/env` (never into the repository, so it never shows up in a changeset);
`/env/profile`, when a setup writes it, is sourced by every later command, which is how they find the environment
(PATH, VIRTUAL_ENV, GOFLAGS…) without being told.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field

DECLARED = ".tb/setup.sh"
ENV_DIR = "/env"
KEY_VERSION = "1"
MAX_SETUP_CHARS = 20_000
# Files whose content decides what a setup installs: a changed one makes a new environment.
MANIFESTS = ("pyproject.toml", "setup.py", "setup.cfg", "requirements.txt", "requirements-dev.txt",
             "requirements-test.txt", "requirements_dev.txt", "requirements_test.txt", "dev-requirements.txt",
             "test-requirements.txt", "package.json", "package-lock.json", "npm-shrinkwrap.json", "pnpm-lock.yaml",
             "yarn.lock", "go.mod", "go.sum", DECLARED)
TEST_EXTRAS = ("test", "tests", "testing", "dev")
# A declared setup may name more files its result depends on: `# tb-cache-key: path [path…]`.
_KEY_LINE = re.compile(r"^#\s*tb-cache-key:\s*(.+)$", re.MULTILINE)
MAX_NAMED = 50  # files a setup may name for its key, in all
# The toolchains a setup may use; their identity is part of the key.
TOOLCHAIN = ("python3", "pip3", "node", "npm", "pnpm", "yarn", "corepack", "go")
JAIL_PATH = ("/usr/local/bin", "/usr/bin", "/bin")

Read = Callable[[str], bytes | None]  # a repository file's content, or None when it is missing


@dataclass
class Plan:
    """A setup to run, and what its result depends on."""

    source: str  # request, .tb/setup.sh or detected
    script: str
    detected: list[str] = field(default_factory=list)
    test_commands: list[str] = field(default_factory=list)
    inputs: dict[str, bytes] = field(default_factory=dict)  # sha256 of each file the key covers, by path

    def key(self, repo: str, toolchain: str) -> str:
        """The cache key: the repository, the script, the files it reads and the toolchain."""
        digest = hashlib.sha256()
        for part in (KEY_VERSION, repo, self.source, self.script, toolchain):
            digest.update(part.encode() + b"\0")
        for path in sorted(self.inputs):
            digest.update(path.encode() + b"\0" + self.inputs[path])
        return digest.hexdigest()[:32]


def plan(requested: str | None, read: Read) -> Plan | None:
    """The setup for a repository: `requested` when given ("" asks for none), else the repository's own
    `.tb/setup.sh`, else one detected from its manifests; None when there is nothing to set up."""
    if requested is not None and not requested.strip():
        return None
    found = {path: data for path in MANIFESTS if (data := read(path)) is not None}
    detected, script, tests = _detect(found)
    inputs = {path: hashlib.sha256(data).digest() for path, data in found.items()}
    if requested is not None:
        return Plan("request", requested, detected, tests, inputs | _named_inputs(requested, read))
    if DECLARED in found:
        declared = found[DECLARED].decode("utf-8", "replace")
        return Plan(DECLARED, declared, detected, tests, inputs | _named_inputs(declared, read))
    if not script:
        return None
    return Plan("detected", script, detected, tests, inputs)


def _named_inputs(script: str, read: Read) -> dict[str, bytes]:
    """The digests of the files a script names for its key: each once, however it is spelled, and few."""
    named: dict[str, bytes] = {}
    for line in _KEY_LINE.findall(script):
        for spelled in line.split():
            path = os.path.normpath(spelled.strip()).lstrip("/")
            if path in named or path.startswith("..") or path == ".":
                continue
            if len(named) >= MAX_NAMED:
                return named
            data = read(path)
            named[path] = hashlib.sha256(data).digest() if data is not None else b""
    return named


def _detect(inputs: dict[str, bytes]) -> tuple[list[str], str, list[str]]:
    """The ecosystems `inputs` show, the script that sets them up, and how their tests run."""
    detected, steps, tests = [], [], []
    python = _python(inputs)
    if python:
        what, step = python
        detected.append(f"python ({what})")
        steps.append(step)
        tests.append("python -m pytest")
    node = _node(inputs)
    if node:
        what, step, has_tests = node
        detected.append(f"node ({what})")
        steps.append(step)
        if has_tests:
            tests.append("npm test")
    if "go.mod" in inputs:
        detected.append("go (go.mod: go mod download)")
        steps.append(GO)
        tests.append("go test ./...")
    if not steps:
        return [], "", []
    return detected, "set -euo pipefail\n" + "\n".join(steps), tests


PIP = "python -m pip install --disable-pip-version-check --no-input --progress-bar off"
PYTHON_ENV = """python3 -m venv /env/python
export VIRTUAL_ENV=/env/python PATH=/env/python/bin:$PATH
printf 'export VIRTUAL_ENV=/env/python\\nexport PATH=/env/python/bin:$PATH\\n' >> /env/profile
"""


def _python(inputs: dict[str, bytes]) -> tuple[str, str] | None:
    requirements = [p for p in MANIFESTS if p.endswith(".txt") and p in inputs]
    extras = _pyproject(inputs["pyproject.toml"]) if "pyproject.toml" in inputs else None
    installable = extras is not None or "setup.py" in inputs
    if not requirements and not installable:
        return None
    lines, what = [PYTHON_ENV], []
    if requirements:
        lines.append(PIP + "".join(f" -r {r}" for r in requirements))
        what += requirements
    if installable:
        target = f".[{','.join(extras)}]" if extras else "."
        # Editable: the package imports from /workspace, so the agents' edits are what the tests run.
        lines.append(f"{PIP} -e '{target}'")
        what.append("pyproject.toml" + (f" with {', '.join(extras)}" if extras else "") if extras is not None
                    else "setup.py")
    return ", ".join(what), "\n".join(lines)


def _pyproject(data: bytes) -> list[str] | None:
    """The test extras a buildable pyproject.toml declares; None when it declares no project to install."""
    try:
        doc = tomllib.loads(data.decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError:
        return None
    project = doc.get("project")
    if not isinstance(project, dict):
        return [] if "build-system" in doc else None
    extras = project.get("optional-dependencies")
    return [e for e in TEST_EXTRAS if isinstance(extras, dict) and e in extras]


def _node(inputs: dict[str, bytes]) -> tuple[str, str, bool] | None:
    if "package.json" not in inputs:
        return None
    try:
        manifest = json.loads(inputs["package.json"])
    except ValueError:
        manifest = {}
    scripts = manifest.get("scripts") if isinstance(manifest, dict) else None
    has_tests = isinstance(scripts, dict) and "test" in scripts
    if "package-lock.json" in inputs or "npm-shrinkwrap.json" in inputs:
        what, install = "package-lock.json: npm ci", "npm ci --no-audit --no-fund"
    elif "pnpm-lock.yaml" in inputs:
        what, install = "pnpm-lock.yaml: pnpm install", _corepack("pnpm", "install --frozen-lockfile")
    elif "yarn.lock" in inputs:
        what, install = "yarn.lock: yarn install", _corepack("yarn", "install --frozen-lockfile")
    else:
        what, install = "package.json without a lockfile: npm install", "npm install --no-audit --no-fund"
    # Installed in the setup's copy of the repository, then moved out of it: /node_modules is on the resolution
    # path of everything under /workspace, and npm run puts /node_modules/.bin on PATH.
    step = (f"{install}\nmv node_modules /env/node_modules\n"
            "printf 'export PATH=/node_modules/.bin:$PATH\\n' >> /env/profile\n")
    return what, step, has_tests


def _corepack(tool: str, args: str) -> str:
    return f"if command -v {tool} >/dev/null; then {tool} {args}; else corepack {tool} {args}; fi"


GO = """export GOPATH=/env/go GOMODCACHE=/env/go/mod GOFLAGS=-mod=mod GOTOOLCHAIN=local GOCACHE=/tmp/go-build
go mod download
printf 'export GOPATH=/env/go GOMODCACHE=/env/go/mod GOFLAGS=-mod=mod GOPROXY=off GOTOOLCHAIN=local \
GOCACHE=/tmp/go-build\\n' >> /env/profile
"""


def toolchain() -> str:
    """The identity of the toolchains the jail sees (the host's /usr): path, size and time of each binary."""
    found = []
    for name in TOOLCHAIN:
        for folder in JAIL_PATH:
            path = os.path.join(folder, name)
            try:
                real = os.path.realpath(path)
                st = os.stat(real)
            except OSError:
                continue
            found.append(f"{name}={real}:{st.st_size}:{st.st_mtime_ns}")
            break
    return ";".join(found)


INVENTORY = r"""
if [ -x /env/python/bin/python ]; then
  pkgs=$(/env/python/bin/python -m pip list --disable-pip-version-check --format=freeze 2>/dev/null \
    | grep -v '^\(pip\|setuptools\)==')
  some=$(printf '%s\n' "$pkgs" | head -8 | sed 's/==/ /' | paste -sd, - | sed 's/,/, /g')
  echo "python: /env/python ($(printf '%s\n' "$pkgs" | grep -c .) packages: $some)"
fi
if [ -d /env/node_modules ]; then
  echo "node: /node_modules ($(find /env/node_modules -mindepth 1 -maxdepth 1 ! -name '.*' | wc -l) packages)"
fi
if [ -d /env/go/mod ]; then
  echo "go: /env/go/mod ($(find /env/go/mod/cache/download -name '*.zip' 2>/dev/null | wc -l) modules)"
fi
exit 0
"""
