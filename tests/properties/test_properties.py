"""Properties that must hold for any input: path confinement, branch names, changesets, SSE framing."""

from __future__ import annotations

import base64
import json
import os
import posixpath
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.redact import Redactor
from orchestrator.events import EventLog, sse
from servers.github.forge import Changeset, ForgeError, check_branch_name, decode_changeset
from servers.sandbox import files
from servers.sandbox.base import SandboxError

ROOT = Path(tempfile.mkdtemp(prefix="tb-props-"))
(ROOT / "repo" / "src").mkdir(parents=True)
(ROOT / "repo" / "src" / "a.py").write_text("x = 1\n")
(ROOT / "secret.txt").write_text("outside\n")
os.symlink(ROOT / "secret.txt", ROOT / "repo" / "link")
os.symlink(ROOT, ROOT / "repo" / "up")
REPO = ROOT / "repo"

segment = st.sampled_from(["..", ".", "src", "a.py", "link", "up", "secret.txt", "", "new", ".git", "x" * 3])
paths = st.lists(segment, min_size=0, max_size=6).map("/".join) | st.text(max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paths, st.booleans())
def test_no_path_reads_or_writes_outside_the_repository(path, absolute):
    path = "/" + path if absolute else path
    try:
        text = files.read_text(REPO, path, 1, 10)
    except (SandboxError, OSError):
        text = ""
    assert "outside" not in text
    try:
        files.write_text(REPO, path, "written")
    except (SandboxError, OSError):
        pass
    assert (ROOT / "secret.txt").read_text() == "outside\n"
    written = [p for p in ROOT.rglob("*") if p.is_file() and not p.is_symlink() and p.read_text() == "written"]
    assert all(REPO in p.parents and ".." not in p.parts for p in written)
    for p in written:
        assert not posixpath.relpath(p, REPO).startswith("..")


names = st.text(alphabet=st.sampled_from(list("ab/.-_@{}~^:?*[\\ lockHEAD\x7f\t")), min_size=0, max_size=20)


@settings(max_examples=150, deadline=None)
@given(names)
def test_branch_names_are_accepted_exactly_when_git_accepts_them(name):
    git = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0
    try:
        check_branch_name(name)
        ours = True
    except ForgeError:
        ours = False
    # We may be stricter than git (a name that git would read as a revision such as '@{-1}'), never looser.
    assert not ours or git, name


entries = st.fixed_dictionaries({
    "path": paths,
    "mode": st.sampled_from(["100644", "100755", "120000"]),
    "content_base64": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=20),
})


@settings(max_examples=300, deadline=None)
@given(st.lists(entries, max_size=5), st.lists(paths, max_size=3), st.sampled_from(["a" * 40, "xyz", ""]))
def test_a_decoded_changeset_holds_only_clean_paths_inside_the_repository(files_, deleted, base):
    try:
        decoded = decode_changeset(Changeset(base_commit=base, files=files_, deleted=deleted))
    except ForgeError:
        return
    for path in [p for p, _, _ in decoded.files] + decoded.deleted:
        assert path == posixpath.normpath(path) and not path.startswith(("/", "../")) and path != ".."
        assert ".git" not in [part.lower() for part in path.split("/")]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("type", "run_id", "seq", "ts")),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
                       max_size=4))
def test_any_event_round_trips_through_sse_framing(fields):
    event = EventLog("run_x")("text", **fields)
    frame = sse(event, Redactor([])).decode()
    assert frame.endswith("\n\n") and frame.count("\n\n") == 1
    lines = frame[:-2].split("\n")
    assert lines[0] == f"id: {event['seq']}" and all(line.startswith("data: ") for line in lines[1:])
    assert json.loads("\n".join(line[6:] for line in lines[1:])) == event
