"""Git on the host that runs nothing a repository names and reads no objects from outside it.

The sandbox's clone and the local forge run git as their server's user (root, often) on repositories that someone
else may control; setting GIT_DIR even skips git's check of who owns the repository. So host git reads no system or
user config, and command-scope settings, which win over every file of the repository, disarm each setting that names
a program. Settings the repository names itself (`filter.<name>.clean`, `credential.<url>.helper`, ...) are found in
its config files and in every file they include, and disarmed one by one; the commands we run use none of them
anyway. Objects a repository borrows from elsewhere (alternates) are refused, not disarmed: git offers no switch.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterable
from pathlib import Path

NOWHERE = "/nonexistent"
# Each setting that names a program git might run, and a value that runs nothing of the repository's.
DISARMED: tuple[tuple[str, str], ...] = (
    ("core.fsmonitor", "false"),
    ("core.hooksPath", "/dev/null"),
    ("core.sshCommand", "false"),
    ("core.askPass", "false"),
    ("core.pager", "cat"),
    ("core.editor", "false"),
    ("sequence.editor", "false"),
    ("core.alternateRefsCommand", "true"),
    ("credential.helper", ""),  # an empty value empties the list of helpers
    ("diff.external", ""),
    ("commit.gpgSign", "false"),
    ("tag.gpgSign", "false"),
    ("gpg.program", "false"),
    ("gpg.openpgp.program", "false"),
    ("gpg.x509.program", "false"),
    ("gpg.ssh.program", "false"),
    ("gpg.ssh.defaultKeyCommand", "false"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
)
# Settings under a name the repository chooses: what to set for each name found. Empty filter commands mean "no
# filter" to git; the other empty commands fail to start, which runs nothing either.
PER_NAME: dict[str, dict[str, str]] = {
    "filter": {"clean": "", "smudge": "", "process": "", "required": "false"},
    "diff": {"command": "", "textconv": ""},
    "merge": {"driver": ""},
    "credential": {"helper": ""},
    "remote": {"uploadpack": "git-upload-pack", "receivepack": "git-receive-pack"},
}
MAX_CONFIG_FILES = 50
CONFIG_TIMEOUT_S = 30


class UnsafeRepository(Exception):
    """A repository host git must not open as it is; the message says why and what to do about it."""


def host_git_env(settings: Iterable[tuple[str, str]] = (), protocols: Iterable[str] = ()) -> dict[str, str]:
    """The environment for host git: no outside config, no prompts, programs disarmed, only `protocols` allowed."""
    pairs = [*DISARMED, *settings]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": NOWHERE,
        "XDG_CONFIG_HOME": NOWHERE,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        # These variables win over the repository's settings of the same programs.
        "GIT_ASKPASS": "false",
        "GIT_SSH_COMMAND": "false",
        "GIT_PAGER": "cat",
        "GIT_EDITOR": "false",
        "GIT_PROXY_COMMAND": "",  # set, even empty, it stops git reading core.gitProxy, where the first value wins
        "GIT_ALLOW_PROTOCOL": ":".join(protocols),  # overrides every protocol.*.allow a repository sets
        # refs/replace/ would let a commit id stand for another commit's tree.
        "GIT_NO_REPLACE_OBJECTS": "1",
        "LC_ALL": "C",
        "GIT_CONFIG_COUNT": str(len(pairs)),
    }
    for i, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


def git_dirs(path: Path) -> tuple[Path, Path] | None:
    """The git directory and the common directory of the repository at `path` (a work tree or bare), or None."""
    dot_git = path / ".git"
    if dot_git.is_dir():
        git_dir = dot_git
    elif (path / "HEAD").is_file() and (path / "objects").is_dir():
        git_dir = path
    elif dot_git.is_file():  # a linked worktree or a submodule: .git names the real git directory
        git_dir = (path / (read_small(dot_git) or "").strip().removeprefix("gitdir:").strip()).resolve()
    else:
        return None
    common = read_small(git_dir / "commondir")
    return git_dir, (git_dir / common.strip()).resolve() if common is not None else git_dir


def check_self_contained(common_dir: Path, name: str) -> None:
    """Refuse a repository whose objects git would read from outside it (alternates, a linked objects directory)."""
    top = common_dir.resolve()
    store = (common_dir / "objects").resolve()
    if not store.is_relative_to(top):
        raise UnsafeRepository(f"{name}: its objects directory is a link to {store}, outside the repository; "
                               "give a repository that holds its own objects")
    pending, seen = [store], set()
    while pending:
        store = pending.pop()
        if store in seen:
            continue
        seen.add(store)
        if _lines(store / "info" / "http-alternates"):
            raise UnsafeRepository(f"{name} borrows objects over HTTP ({store}/info/http-alternates); delete that "
                                   "file, or give a repository that holds its own objects")
        for line in _lines(store / "info" / "alternates"):
            # Git reads a quoted line with C escapes; whatever such a line names, we do not follow it.
            target = Path(NOWHERE) if line.startswith('"') else (store / line).resolve()
            if not target.is_relative_to(top):
                raise UnsafeRepository(
                    f"{name} borrows objects from {line[:300]!r} ({store}/info/alternates), outside the "
                    "repository, whose objects would be read as this one's; make it self-contained with "
                    "`git repack -a -d` and delete objects/info/alternates, or give another repository")
            pending.append(target)


def _lines(path: Path) -> list[str]:
    """The entries of an alternates file: neither blank nor comments."""
    text = read_small(path)
    return [] if text is None else [line for line in text.split("\n") if line.strip() and not line.startswith("#")]


def read_small(path: Path, limit: int = 1 << 20) -> str | None:
    """The text of a small regular file the repository holds, or None when there is none."""
    # A FIFO, a device or a huge file is refused unread: whoever owns the repository may have put it there to hang us.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UnsafeRepository(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeRepository(f"{path} is not a regular file; git would not read it as a repository file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnsafeRepository(f"{path} is larger than {limit} bytes; no repository needs that")
    return data.decode("utf-8", "replace")


async def named_settings(git_dir: Path, common_dir: Path) -> list[tuple[str, str]]:
    """Settings that disarm each driver, helper and remote program named in the repository's config files."""
    # Included files count whatever an includeIf's condition: reading more than git would is safe, less is not.
    pending = [common_dir / "config", common_dir / "config.worktree", git_dir / "config.worktree"]
    read: set[Path] = set()
    names: set[tuple[str, str]] = set()
    while pending:
        path = pending.pop()
        if path in read or not path.is_file():
            continue
        if len(read) >= MAX_CONFIG_FILES:
            raise UnsafeRepository(f"{common_dir}: its config includes more than {MAX_CONFIG_FILES} files; "
                                   "give a repository whose config git can read in a few")
        read.add(path)
        for key, value in await _config_entries(path):
            section, _, rest = key.partition(".")
            subsection, _, variable = rest.rpartition(".")
            if section in ("include", "includeif") and variable == "path" and value:
                pending.append(_included(path, value))
            elif subsection and section in PER_NAME:
                names.add((section, subsection))
    return [(f"{section}.{sub}.{variable}", value) for section, sub in sorted(names)
            for variable, value in PER_NAME[section].items()]


def _included(including: Path, value: str) -> Path:
    """The file an include names, resolved as host git resolves it (with HOME unset to NOWHERE)."""
    if value == "~" or value.startswith("~/"):
        return Path(NOWHERE) / value[2:]
    if value.startswith("~"):
        return Path(os.path.expanduser(value))
    if value.startswith("%(prefix)/"):
        raise UnsafeRepository(f"{including} includes {value!r}, relative to git's install prefix; remove that "
                               "include, or give a repository without it")
    return including.parent / value


async def _config_entries(path: Path) -> list[tuple[str, str]]:
    """Every (key, value) in one config file, without following its includes; running this executes nothing."""
    proc = await asyncio.create_subprocess_exec(
        "git", "config", "--file", str(path), "--no-includes", "--list", "-z", cwd="/", env=host_git_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(CONFIG_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise UnsafeRepository(f"reading {path} took longer than {CONFIG_TIMEOUT_S} s; is it a regular file?") \
            from None
    if proc.returncode != 0:
        raise UnsafeRepository(f"git cannot read {path}: {err.decode('utf-8', 'replace').strip()[-400:]}; "
                               "fix or remove that config file")
    entries = []
    for entry in out.decode("utf-8", "replace").split("\0"):
        if entry:
            key, _, value = entry.partition("\n")
            entries.append((key, value))
    return entries
