"""Reaching GitHub: which repository a `repo` string names, and an authenticated PyGithub client for it."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from github import Auth, Github, GithubIntegration, GithubRetry
from github.GithubException import UnknownObjectException

from common import repos

from .config import Settings
from .forge import ForgeError, ForgeUnavailable

NO_TOKEN = ("GITHUB_TOKEN is not set: export a token that can write contents and pull requests (or set "
            "GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY) to use GitHub repositories; local repositories need none")


def github_name(repo: str, api_url: str) -> str | None:
    """`owner/name` for a GitHub repository given as owner/name or an https URL; None for other forms."""
    api_host = urlsplit(api_url).hostname or ""
    hosts = ("github.com",) if api_host == "api.github.com" else (api_host,)
    try:
        ref = repos.parse(repo, hosts)
    except repos.RepoError as exc:
        raise ForgeError(str(exc)) from None
    if ref.kind == "https":
        raise ForgeError(f"{ref.url[:200]} is not a GitHub repository this server knows (its host is no GitHub "
                         f"host); give owner/name or https://{hosts[0]}/owner/name")
    return ref.full_name if ref.kind == "github" else None


class Clients:
    """One PyGithub client per credential, built on first use: a token, or one GitHub App installation per repo."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._by_repo: dict[str, Github] = {}
        self.forks: dict[str, str] = {}

    def _options(self) -> dict[str, Any]:
        retry = GithubRetry(total=3, backoff_factor=0.5, max_rate_limit_wait=self.settings.max_rate_limit_wait_s)
        return {"base_url": self.settings.api_url, "retry": retry, "timeout": 30, "seconds_between_requests": None,
                "seconds_between_writes": self.settings.write_interval_s or None}

    def for_repo(self, full_name: str) -> Github:
        """The client that acts on `full_name`."""
        key = full_name if self.settings.app_id else ""
        with self._lock:
            if key not in self._by_repo:
                self._by_repo[key] = Github(auth=self._auth(full_name), **self._options())
            return self._by_repo[key]

    def _auth(self, full_name: str) -> Auth.Auth:
        s = self.settings
        if s.app_id and s.app_private_key:
            app = Auth.AppAuth(s.app_id, s.app_private_key.reveal())
            integration = GithubIntegration(auth=app, **self._options())
            try:
                installation = integration.get_repo_installation(*full_name.split("/"))
            except UnknownObjectException:
                raise ForgeError(f"the GitHub App {s.app_id} is not installed on {full_name}") from None
            return app.get_installation_auth(installation.id)
        if s.token is None:
            raise ForgeUnavailable(NO_TOKEN)
        return Auth.Token(s.token.reveal())
