"""A hostile repository: a program hidden behind each setting through which host git could be made to run it.

Every planted program appends its own path to one marker file, so a test sees whether anything ran, and what.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Committed in the tree, and written to the git directory's info/attributes (which bare repositories read), so
# that every path names the planted filter, diff and merge drivers.
ATTRIBUTES = "* filter=evil diff=evil merge=evil\n*.txt filter=proc\n*.inc filter=inc\n"
HOOKS = ("reference-transaction", "pre-commit", "post-commit", "post-checkout", "post-index-change", "post-merge",
         "pre-auto-gc", "post-rewrite", "pre-push", "pre-receive", "update", "post-receive", "post-update",
         "proc-receive", "push-to-checkout", "fsmonitor-watchman", "sendemail-validate", "commit-msg")
PROGRAM = "{program}"
SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- not yours\n"


@dataclass(frozen=True)
class Attack:
    name: str
    config: dict[str, str] = field(default_factory=dict)
    included: dict[str, str] = field(default_factory=dict)  # written to another file the config includes
    hooks_in_git_dir: bool = False

    def __str__(self) -> str:
        return self.name


ATTACKS = [
    Attack("core.fsmonitor", {"core.fsmonitor": PROGRAM}),
    Attack("hooks in the git directory", hooks_in_git_dir=True),
    Attack("core.hooksPath", {"core.hooksPath": "{hooks}"}),
    Attack("clean and smudge filters", {"filter.evil.clean": PROGRAM, "filter.evil.smudge": PROGRAM,
                                        "filter.evil.required": "true"}),
    Attack("a filter process", {"filter.proc.process": PROGRAM, "filter.proc.required": "true"}),
    Attack("diff drivers and textconv", {"diff.evil.command": PROGRAM, "diff.evil.textconv": PROGRAM,
                                         "diff.external": PROGRAM}),
    Attack("merge drivers", {"merge.evil.driver": PROGRAM}),
    Attack("core.sshCommand", {"core.sshCommand": PROGRAM, "remote.origin.url": "ssh://git@example.invalid/r",
                               "core.gitProxy": PROGRAM}),
    Attack("credential helpers", {"credential.helper": PROGRAM, "credential.https://example.invalid.helper": PROGRAM,
                                  "remote.origin.url": "https://example.invalid/r"}),
    Attack("pager, editor and askpass", {"core.pager": PROGRAM, "pager.log": PROGRAM, "core.editor": PROGRAM,
                                         "sequence.editor": PROGRAM, "core.askPass": PROGRAM}),
    Attack("pack-objects hook and remote programs", {
        "uploadpack.packObjectsHook": PROGRAM, "remote.origin.url": "/nonexistent/r",
        "remote.origin.uploadpack": PROGRAM, "remote.origin.receivepack": PROGRAM,
        "core.alternateRefsCommand": PROGRAM}),
    Attack("the ext transport", {"protocol.allow": "always", "protocol.ext.allow": "always",
                                 "remote.origin.url": "ext::{program} %S", "url.ext::{program} %S#.insteadOf": "/"}),
    Attack("signing programs", {"commit.gpgSign": "true", "gpg.program": PROGRAM, "gpg.format": "openpgp",
                                "gpg.ssh.program": PROGRAM, "gpg.ssh.defaultKeyCommand": PROGRAM}),
    Attack("include.path", {"include.path": "{included}"},
           included={"core.fsmonitor": PROGRAM, "filter.inc.clean": PROGRAM, "filter.inc.required": "true",
                     "core.hooksPath": "{hooks}"}),
    Attack("includeIf", {"includeIf.gitdir:/.path": "{included}"},
           included={"core.fsmonitor": PROGRAM, "filter.inc.clean": PROGRAM, "filter.inc.required": "true"}),
]


def git_dir(repo: Path) -> Path:
    """The git directory of a work tree or bare repository made by `make_repo`."""
    return repo / ".git" if (repo / ".git").is_dir() else repo


def plant(repo: Path, attack: Attack, lair: Path) -> Path:
    """Plant `attack` in `repo`, with its programs in `lair`; the marker file each program appends to when run."""
    marker = lair / "ran"
    program = lair / "program"
    hooks = lair / "hooks"
    hooks.mkdir(parents=True)
    script = f"#!/bin/sh\necho \"$0 $*\" >> '{marker}'\n"
    program.write_text(script)
    program.chmod(0o755)
    folders = [hooks, git_dir(repo) / "hooks"] if attack.hooks_in_git_dir else [hooks]
    for folder in folders:
        folder.mkdir(exist_ok=True)
        for name in HOOKS:
            (folder / name).write_text(script)
            (folder / name).chmod(0o755)
    included = lair / "included.config"
    values = {"{program}": str(program), "{hooks}": str(hooks), "{included}": str(included)}
    for key, value in attack.included.items():
        set_config(included, key, fill(value, values))
    for key, value in attack.config.items():
        set_config(git_dir(repo) / "config", fill(key, values), fill(value, values))
    (git_dir(repo) / "info").mkdir(exist_ok=True)
    (git_dir(repo) / "info" / "attributes").write_text(ATTRIBUTES)
    return marker


def fill(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def set_config(path: Path, key: str, value: str) -> None:
    """Write one setting to a config file; `git config --file` opens no repository and runs nothing."""
    subprocess.run(["git", "config", "--file", str(path), key, value], check=True, cwd="/",
                   env={"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"})


def ran(marker: Path) -> list[str]:
    """What the planted programs recorded: one line per run, empty when none ran."""
    return marker.read_text().splitlines() if marker.exists() else []


def borrow(how: str, repo: Path, secret: Path) -> None:
    """Make `repo` read objects from `secret` the way `how` says."""
    store, theirs = git_dir(repo) / "objects", secret / ".git" / "objects"
    if how == "absolute alternates":
        (store / "info" / "alternates").write_text(f"{theirs}\n")
    elif how == "relative alternates":
        (store / "info" / "alternates").write_text(f"# borrowed\n{os.path.relpath(theirs, store)}\n")
    elif how == "alternates chained through the repository":
        relay = git_dir(repo) / "relay"
        (relay / "info").mkdir(parents=True)
        (relay / "info" / "alternates").write_text(f"{theirs}\n")
        (store / "info" / "alternates").write_text("../relay\n")
    elif how == "http-alternates":
        (store / "info" / "http-alternates").write_text("https://example.invalid/secret.git/objects\n")
    elif how == "a linked objects directory":
        shutil.copytree(store, theirs, dirs_exist_ok=True)  # the repository's own commits must still be found
        shutil.rmtree(store)
        store.symlink_to(theirs)


BORROWINGS = ["absolute alternates", "relative alternates", "alternates chained through the repository",
              "http-alternates", "a linked objects directory"]
