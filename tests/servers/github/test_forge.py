"""The checks every write passes before either forge touches anything, and the secrets that never print."""

from __future__ import annotations

import base64
import io
import logging
import os
import subprocess

import pytest

from common.redact import RedactingFilter, Redactor
from common.settings import ConfigError
from servers.github.config import Settings
from servers.github.forge import Changeset, ForgeError, check_branch_name, check_writable_branch, decode_changeset

TOKEN = "ghp_" + "k" * 36
SHA = "a" * 40


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("name", [
    "tb/fix", "tb/a-b_c.d", "tb/ünïcode", "tb/x@y", "a", "tb/a.b/c", "tb/.hidden", "tb/a..b", "tb/a.lock", "tb/a/",
    "tb//a", "tb/a b", "tb/a~1", "tb/a^", "tb/a:b", "tb/a?", "tb/a*", "tb/a[", "tb/a\\b", "tb/a@{1}", "tb/a.",
    "-tb", "tb/\x01", "/tb"])
def test_branch_names_are_judged_as_git_judges_them(name: str) -> None:
    git_accepts = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True,
                                 env=os.environ | {"GIT_CONFIG_GLOBAL": "/dev/null"}).returncode == 0
    try:
        check_branch_name(name)
        accepted = True
    except ForgeError:
        accepted = False
    assert accepted == git_accepts


def test_only_branches_inside_the_prefix_and_off_the_default_branch_are_writable() -> None:
    check_writable_branch("tb/x", "tb/", "main")
    for branch in ("main", "tb", "feature/tb/x"):
        with pytest.raises(ForgeError, match="only writes branches that start with 'tb/'"):
            check_writable_branch(branch, "tb/", "develop")
    for branch in ("@", "HEAD", "refs/heads/tb/x"):
        with pytest.raises(ForgeError, match="not valid"):
            check_writable_branch(branch, "", "develop")
    with pytest.raises(ForgeError, match="default"):
        check_writable_branch("tb/main", "tb/", "tb/main")


@pytest.mark.parametrize("files,deleted,message", [
    ([], [], "empty"),
    ([{"path": "../x", "mode": "100644", "content_base64": ""}], [], "not a clean relative path"),
    ([{"path": "/etc/passwd", "mode": "100644", "content_base64": ""}], [], "absolute"),
    ([{"path": ".git/config", "mode": "100644", "content_base64": ""}], [], "inside .git"),
    ([{"path": "sub/.GIT/hooks/x", "mode": "100644", "content_base64": ""}], [], "inside .git"),
    ([{"path": "a//b", "mode": "100644", "content_base64": ""}], [], "not a clean"),
    ([{"path": "a", "mode": "100644", "content_base64": "not base64!"}], [], "not valid base64"),
    ([{"path": "a", "mode": "100644", "content_base64": "QQ"}], [], "not valid base64"),
    ([{"path": "l", "mode": "120000", "content_base64": ""}], [], "symbolic link"),
    ([{"path": "a", "mode": "100644", "content_base64": ""}] * 2, [], "twice"),
    ([{"path": "a", "mode": "100644", "content_base64": ""}], ["a"], "both written and deleted"),
    ([], [".git/HEAD"], "inside .git"),
])
def test_a_malformed_changeset_is_refused_with_the_reason(files: list, deleted: list, message: str) -> None:
    with pytest.raises(ForgeError, match=message):
        decode_changeset(Changeset(base_commit=SHA, files=files, deleted=deleted))


def test_a_changeset_needs_a_full_base_commit_and_bounded_sizes() -> None:
    with pytest.raises(ForgeError, match="base_commit"):
        decode_changeset(Changeset(base_commit="abc123", deleted=["a"]))
    huge = [{"path": f"f{i}", "mode": "100644", "content_base64": encoded(b"x" * 9_000_000)} for i in range(6)]
    with pytest.raises(ForgeError, match="more than"):
        decode_changeset(Changeset(base_commit=SHA, files=huge))


def test_a_well_formed_changeset_decodes_to_bytes() -> None:
    decoded = decode_changeset(Changeset(base_commit=SHA.upper(), deleted=["gone.txt"], files=[
        {"path": "bin/tool", "mode": "100755", "content_base64": encoded(b"\x00\x01")}]))
    assert decoded.base_commit == SHA
    assert decoded.files == [("bin/tool", "100755", b"\x00\x01")] and decoded.deleted == ["gone.txt"]


def test_settings_read_the_environment_and_never_print_the_token() -> None:
    settings = Settings.from_env({"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": "https://ghe.example.com/api/v3/",
                                  "GITHUB_BRANCH_PREFIX": "bot/"})
    assert (settings.api_url, settings.branch_prefix) == ("https://ghe.example.com/api/v3", "bot/")
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.token)
    assert settings.token is not None and settings.token.reveal() == TOKEN
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"GITHUB_BRANCH_PREFIX": "bad prefix/", "GITHUB_TOKEN": TOKEN, "GITHUB_WRITE_INTERVAL_S": "x",
                           "GITHUB_APP_PRIVATE_KEY": "/nonexistent/key.pem"})
    for name in ("GITHUB_BRANCH_PREFIX", "GITHUB_WRITE_INTERVAL_S", "GITHUB_APP_PRIVATE_KEY"):
        assert name in str(bad.value)
    assert "/nonexistent/key.pem" not in str(bad.value)  # a secret's value is never repeated


def test_redaction_masks_known_secrets_and_token_shapes_in_messages_and_logs() -> None:
    custom = "s3cr3t-value"
    text = f"{TOKEN} github_pat_{'x' * 30} {custom} ghs_{'y' * 36}"
    assert Redactor([custom])(text).count("[redacted]") == 4
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(Redactor([custom])))
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    try:
        logger.error("auth %s", custom)
        try:
            raise RuntimeError(f"boom {TOKEN}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert custom not in out.getvalue() and TOKEN not in out.getvalue() and "[redacted]" in out.getvalue()
