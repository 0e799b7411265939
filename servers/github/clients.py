"""Reaching GitHub: which repository a `repo` string names, and an authenticated PyGithub client for it, whose
requests go one at a time (each for as long as GitHub takes to answer it, never while one waits) and wait out the
rate limits GitHub asks them to."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import jwt
from github import Auth, Github, GithubIntegration, GithubRetry
from github.GithubException import RateLimitExceededExceedsMaxWait, UnknownObjectException
from github.Requester import HTTPRequestsConnectionClass, HTTPSRequestsConnectionClass, Requester
from urllib3 import BaseHTTPResponse
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from common import repos

from .config import Settings
from .forge import ForgeError, ForgeUnavailable

NO_TOKEN = ("GITHUB_TOKEN is not set: export a token that can write contents and pull requests (or set "
            "GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY) to use GitHub repositories; local repositories need none")
# How long a request waits for its turn (see `Gate`): far longer than a request takes (30 s at most, each try).
GATE_WAIT_S = 120.0
PER_PAGE = 100  # GitHub's largest page: fewer requests for every list


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


class Gate:
    """One request at a time to GitHub for one credential, as GitHub asks ("make requests for a single user or client
    ID serially": docs.github.com/rest/using-the-rest-api/best-practices-for-using-the-rest-api). A request holds it
    while it is sent and answered, never while it waits (a rate limit's retry-after, a backoff: `released`), and waits
    for it at most `wait_s`, then fails with a ForgeError."""

    def __init__(self, wait_s: float | None = None) -> None:
        self.wait_s = GATE_WAIT_S if wait_s is None else wait_s
        self._lock = threading.Lock()
        self._mine = threading.local()

    def enter(self) -> None:
        if not self._lock.acquire(timeout=self.wait_s):
            raise ForgeError(f"GitHub requests of this server waited more than {self.wait_s:g} s for an earlier one "
                             "to be answered; GitHub is slow or unreachable: try again in a few minutes")
        self._mine.held = True

    def leave(self) -> None:
        if getattr(self._mine, "held", False):
            self._mine.held = False
            self._lock.release()

    @contextmanager
    def released(self) -> Iterator[None]:
        """Let other requests go while this thread waits, and take the turn back after."""
        if not getattr(self._mine, "held", False):
            yield
            return
        self.leave()
        try:
            yield
        finally:
            self.enter()


def gated(github: Github, gate: Gate) -> Github:
    """`github`, each of whose requests holds `gate` from when it is sent until it is answered. PyGithub has no
    per-client hook for this (`Requester.injectConnectionClasses` is process-wide and ends persistent connections),
    so the requester's connection class is replaced; it also keeps two threads from sending through the one
    connection object a requester shares, which holds a request's method and URL between `request` and
    `getresponse`."""
    requester = github.requester
    base = requester._Requester__connectionClass  # type: ignore[attr-defined]
    assert issubclass(base, (HTTPRequestsConnectionClass, HTTPSRequestsConnectionClass)), base

    class GatedConnection(base):  # type: ignore[misc, valid-type]
        def request(self, verb: str, url: str, input: Any, headers: dict[str, str], stream: bool = False) -> None:
            gate.enter()
            super().request(verb, url, input, headers, stream)

        def getresponse(self) -> Any:
            try:
                return super().getresponse()
            finally:
                gate.leave()

    requester._Requester__connectionClass = GatedConnection  # type: ignore[attr-defined]
    return github


class RateLimitRetry(GithubRetry):
    """PyGithub's retry (5xx, rate limits, POST included), with GitHub's rules for rate limits (docs.github.com/rest/
    using-the-rest-api/best-practices-for-using-the-rest-api#handle-rate-limit-errors-appropriately) where GithubRetry
    lacks them: a 429 is a rate limit as a 403 is; `retry-after`, when given, is the wait, and every wait is bounded by
    `max_rate_limit_wait` (GithubRetry bounds only its own) — beyond it the request fails at once, saying how long;
    a rate-limited request of any method, PATCH included, is sent again, because GitHub did not process it; and once
    the retries are spent, the error is GitHub's answer. The waiting itself is urllib3's (`retry-after`, else the
    backoff set here), so no wait is added twice, and other requests go meanwhile (`gate` is released)."""

    def __init__(self, gate: Gate | None = None, **kwargs: Any) -> None:
        self.gate = gate
        super().__init__(**kwargs)

    def new(self, **kw: Any) -> RateLimitRetry:
        retry = super().new(**kw)
        retry.gate = self.gate
        return retry

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        with self.gate.released() if self.gate is not None else nullcontext():
            super().sleep(response)

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return status_code in (403, 429) or super().is_retry(method, status_code, has_retry_after)

    def increment(self, method: str | None = None, url: str | None = None,  # type: ignore[override]
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: Any = None, _stacktrace: Any = None) -> Retry:
        if response is None or response.status not in (403, 429):
            return super().increment(method, url, response, error, _pool, _stacktrace)
        headers = dict(response.headers)
        try:
            content = json.loads(self.get_content(response, url or ""))
        except ValueError:
            content = {"message": response.reason}
        message = str(content.get("message", "")) if isinstance(content, dict) else ""
        if response.status == 403 and "Retry-After" not in response.headers \
                and not Requester.isRateLimitError(message):
            raise Requester.createException(403, headers, content)  # a refusal, not a limit
        wait = self._wait(response, message)
        if self.max_rate_limit_wait is not None and wait > self.max_rate_limit_wait:
            raise RateLimitExceededExceedsMaxWait(response.status, content, headers, wait=wait)
        try:
            retry = Retry.increment(self, method, url, response, error, _pool, _stacktrace)
        except MaxRetryError:
            raise Requester.createException(response.status, headers, content) from None
        retry.get_backoff_time = lambda: wait  # type: ignore[method-assign]
        return retry

    def _wait(self, response: BaseHTTPResponse, message: str) -> float:
        """How long GitHub asks to wait: `retry-after`; else until the reset when the primary limit is spent; else
        at least a minute."""
        if "Retry-After" in response.headers:
            return self.parse_retry_after(response.headers["Retry-After"])
        reset = response.headers.get("X-RateLimit-Reset", "")
        spent = response.headers.get("X-RateLimit-Remaining") == "0" or Requester.isPrimaryRateLimitError(message)
        if spent and reset.isdigit():
            return max(0.0, int(reset) - datetime.now(timezone.utc).timestamp()) + 1
        return self.secondary_rate_wait


class Clients:
    """One PyGithub client per credential, built on first use: a token, or one GitHub App installation per repo.
    Each client's requests go one at a time (`Gate`); operations through it may interleave."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._by_repo: dict[str, Github] = {}
        self._login: str | None = None
        self.forks: dict[str, str] = {}

    def _options(self, gate: Gate | None = None) -> dict[str, Any]:
        # Once retries of a 5xx are spent, GitHub's last answer rather than urllib3's MaxRetryError.
        retry = RateLimitRetry(gate=gate, total=3, backoff_factor=0.5,
                               max_rate_limit_wait=self.settings.max_rate_limit_wait_s, raise_on_status=False)
        return {"base_url": self.settings.api_url, "retry": retry, "timeout": 30, "seconds_between_requests": None,
                "seconds_between_writes": self.settings.write_interval_s or None, "per_page": PER_PAGE}

    def for_repo(self, full_name: str) -> Github:
        """The client that acts on `full_name`."""
        key = full_name if self.settings.app_id else ""
        with self._lock:
            if key not in self._by_repo:
                gate = Gate()
                self._by_repo[key] = gated(Github(auth=self._auth(full_name), **self._options(gate)), gate)
            return self._by_repo[key]

    def login(self, full_name: str) -> str:
        """Who this server is on GitHub, the author of the comments it writes: the token's user (GET /user), or the
        App's bot, `<slug>[bot]` (GET /app); asked once."""
        if self._login is None:
            if self.settings.app_id and self.settings.app_private_key:
                self._login = f"{self._integration().get_app().slug}[bot]"
            else:
                self._login = self.for_repo(full_name).get_user().login
        return self._login

    def _integration(self) -> GithubIntegration:
        """The GitHub App itself, authenticated with a JSON web token signed by its private key."""
        s = self.settings
        assert s.app_id and s.app_private_key
        app = Auth.AppAuth(s.app_id, s.app_private_key.reveal())
        try:
            app.create_jwt()
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ForgeUnavailable(f"GITHUB_APP_PRIVATE_KEY cannot sign the GitHub App's token "
                                   f"({type(exc).__name__}): give the App's private key (PEM) or its file's path") \
                from None
        return GithubIntegration(auth=app, **self._options())

    def _auth(self, full_name: str) -> Auth.Auth:
        s = self.settings
        if s.app_id and s.app_private_key:
            integration = self._integration()
            try:
                installation = integration.get_repo_installation(*full_name.split("/"))
            except UnknownObjectException:
                raise ForgeError(f"the GitHub App {s.app_id} is not installed on {full_name}: install it on the "
                                 "repository (its settings, GitHub Apps) or use another repository") from None
            return integration.auth.get_installation_auth(installation.id)
        if s.token is None:
            raise ForgeUnavailable(NO_TOKEN)
        return Auth.Token(s.token.reveal())
