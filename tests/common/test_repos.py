"""One reading of repository references for the orchestrator, the sandbox's clone and the github server."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.repos import RepoError, parse
from servers.github.clients import github_name
from servers.github.forge import ForgeError
from servers.github.local import local_path
from servers.sandbox.base import SandboxError
from servers.sandbox.clone import source_of


@pytest.mark.parametrize("given", ["octo/demo", "octo/demo.git", "https://github.com/octo/demo",
                                   "https://github.com/octo/demo.git", "https://github.com/octo/demo/",
                                   "https://www.github.com/octo/demo", " octo/demo "])
def test_every_spelling_of_a_github_repository_is_one_repository(given):
    ref = parse(given)
    assert (ref.kind, ref.full_name, str(ref)) == ("github", "octo/demo", "https://github.com/octo/demo")
    assert source_of(given) == ("https://github.com/octo/demo.git", False)  # never demo.git.git
    assert github_name(given, "https://api.github.com") == "octo/demo"


@pytest.mark.parametrize("given", ["octo/..", "octo/.", "https://github.com/octo/..", "../etc", "octo",
                                   "https://x:y@github.com/octo/demo", "ssh://git@github.com/octo/demo",
                                   "http://github.com/octo/demo", "octo/demo\x00", "", "a" * 3000,
                                   "file://example.com/srv/repo", "relative/path/to/repo.d/x"])
def test_what_names_no_repository_is_refused_the_same_everywhere(given):
    with pytest.raises(RepoError):
        parse(given)
    with pytest.raises(SandboxError):
        source_of(given)


def test_a_file_url_is_decoded_the_same_by_the_clone_and_the_forge(tmp_path):
    repo = tmp_path / "my repo"
    (repo / ".git").mkdir(parents=True)
    url = "file://" + str(repo).replace(" ", "%20")
    assert local_path(url) == repo
    assert source_of(url) == (str(repo), True)
    assert parse(str(repo) + "/").path == repo


def test_another_https_remote_is_cloned_but_is_no_github_repository():
    assert parse("https://gitlab.com/octo/demo").kind == "https"
    assert source_of("https://gitlab.com/octo/demo") == ("https://gitlab.com/octo/demo", False)
    with pytest.raises(ForgeError, match="not a GitHub repository"):
        github_name("https://gitlab.com/octo/demo", "https://api.github.com")
    assert parse("https://ghe.example.com/octo/demo", ("ghe.example.com",)).full_name == "octo/demo"
    assert local_path("octo/demo") is None and Path("/srv") == local_path("/srv/")
