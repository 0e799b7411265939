"""Reaching GitHub: which repository a `repo` string names, and an authenticated PyGithub client for it."""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import urlsplit

from github import Auth, Github, GithubIntegration, GithubRetry
from github.GithubException import UnknownObjectException

from .config import Settings
from .forge import ForgeError, ForgeUnavailable

_OWNER_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/([A-Za-z0-9._-]{1,100})$")
NO_TOKEN = ("GITHUB_TOKEN is not set: export a token that can write contents and pull requests (or set "
            "GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY) to use GitHub repositories; local repositories need none")


def github_name(repo: str, api_url: str) -> str | None:
    """`owner/name` for a GitHub repository given as owner/name or an https URL; None for other forms."""
    repo = repo.strip()
    if _OWNER_NAME.match(repo.removesuffix(".git")):
        return repo.removesuffix(".git")
    if not repo.startswith("https://"):
        return None
    parts = urlsplit(repo)
    if parts.username or parts.password:
        raise ForgeError("the repository URL carries credentials; give https://github.com/owner/name or owner/name")
    api_host = urlsplit(api_url).hostname or ""
    hosts = {"github.com", "www.github.com"} if api_host == "api.github.com" else {api_host}
    path = parts.path.strip("/").removesuffix(".git")
    if parts.hostname not in hosts or not _OWNER_NAME.match(path):
        raise ForgeError(f"{parts.hostname}{parts.path[:200]} is not a GitHub repository this server knows; "
                         f"give owner/name or https://{sorted(hosts)[0]}/owner/name")
    return path


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
