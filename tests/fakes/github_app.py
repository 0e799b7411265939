"""The fake GitHub's Apps: the RS256 JSON web token an App signs, checked as GitHub checks it, the App's installations,
and the installation access tokens they hand out, which expire
(docs.github.com/apps/creating-github-apps/authenticating-with-a-github-app, docs.github.com/rest/apps/apps)."""

from __future__ import annotations

import datetime
import json
import re
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jwt
from aiohttp import web

from .github_json import error

if TYPE_CHECKING:
    from .github_api import FakeGitHub

MAX_JWT_LIFETIME_S = 600
CLOCK_DRIFT_S = 60  # GitHub's advice: set iat 60 s in the past
_JWT_ROUTE = re.compile(r"^/(app(/.*)?|repos/[^/]+/[^/]+/installation)$")
PERMISSIONS = {"contents": "write", "pull_requests": "write", "issues": "write", "metadata": "read"}


@dataclass
class FakeApp:
    id: int
    public_key: str  # PEM
    slug: str
    installations: dict[int, set[str]] = field(default_factory=dict)  # installation id -> repositories it may use

    @property
    def bot(self) -> str:
        """The login the App's installation tokens act as."""
        return f"{self.slug}[bot]"


APP = web.RequestKey("app", FakeApp)


@dataclass
class IssuedToken:
    token: str
    installation: int
    issued_at: float
    expires_at: int  # epoch seconds, as `expires_at` says


class Apps:
    """The Apps registered with the fake, and every installation token it issued."""

    def __init__(self, api: FakeGitHub) -> None:
        self.api = api
        self.apps: dict[str, FakeApp] = {}
        self.issued: list[IssuedToken] = []
        self._installations = 0

    def add(self, app_id: int, public_key_pem: str, slug: str = "tiny-backspace") -> FakeApp:
        """An App whose JSON web tokens verify with `public_key_pem`."""
        app = FakeApp(app_id, public_key_pem, slug)
        self.apps[str(app_id)] = app
        return app

    def install(self, app_id: int, full_name: str) -> int:
        """Install the App on a repository (its owner's installation, made when missing); the installation id."""
        app, owner = self.apps[str(app_id)], full_name.split("/")[0]
        found = next((i for i, repos in app.installations.items() if next(iter(repos)).split("/")[0] == owner), None)
        if found is None:
            self._installations += 1
            found = self._installations
            app.installations[found] = set()
        app.installations[found].add(full_name)
        self.api.repos[full_name].pushers.add(app.bot)
        return found

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/app", self.get_app), web.get("/repos/{owner}/{name}/installation", self.repo_installation),
                web.post("/app/installations/{id}/access_tokens", self.create_token)]

    @staticmethod
    def wants_jwt(request: web.Request) -> bool:
        """Whether the endpoint authenticates the App itself, with a JSON web token."""
        return bool(_JWT_ROUTE.match(request.path))

    def verify(self, authorization: str) -> FakeApp | web.Response:
        """The App that signed the bearer JWT, or GitHub's answer to a token it refuses."""
        kind, _, token = authorization.partition(" ")
        undecodable = error(401, "A JSON web token could not be decoded")
        if kind.lower() != "bearer" or token.count(".") != 2:
            return undecodable
        # The claims are checked here, as GitHub words it (`iss` may be a number, which PyJWT's claims would refuse).
        jws = jwt.api_jws.PyJWS()
        try:
            claims = json.loads(jws.decode_complete(token, options={"verify_signature": False})["payload"])
            app = self.apps.get(str(claims.get("iss"))) if isinstance(claims, dict) else None
            if app is None:
                return error(404, "Integration not found")
            jws.decode(token, app.public_key, algorithms=["RS256"])
        except (jwt.PyJWTError, ValueError):
            return undecodable
        iat, exp, now = claims.get("iat"), claims.get("exp"), time.time()
        if not isinstance(iat, int) or iat > now + CLOCK_DRIFT_S:
            return error(401, "'Issued at' claim ('iat') must be an Integer representing the time that the "
                              "assertion was issued")
        if not isinstance(exp, (int, float)) or exp <= now:
            return error(401, "'Expiration time' claim ('exp') must be a numeric value representing the future "
                              "time at which the assertion expires")
        if exp - iat > MAX_JWT_LIFETIME_S or exp > now + MAX_JWT_LIFETIME_S:
            return error(401, "'Expiration time' claim ('exp') is too far in the future")
        return app

    def reach(self, token: str) -> set[str] | None:
        """The repositories an installation's token may use (its installation's, as they are now); None for a token
        that is no installation's."""
        issued = next((t for t in self.issued if t.token == token), None)
        if issued is None:
            return None
        return next(app.installations[issued.installation] for app in self.apps.values()
                    if issued.installation in app.installations)

    def expired(self, token: str) -> bool:
        """Whether `token` is an installation token past its `expires_at`."""
        return any(t.token == token and time.time() >= t.expires_at for t in self.issued)

    def _installation_json(self, app: FakeApp, installation: int) -> dict[str, object]:
        owner = next(iter(app.installations[installation])).split("/")[0]
        base = self.api.base_url
        return {"id": installation, "app_id": app.id, "app_slug": app.slug, "target_id": 1, "target_type": "User",
                "account": {"login": owner, "id": 1, "type": "User"}, "repository_selection": "selected",
                "access_tokens_url": f"{base}/app/installations/{installation}/access_tokens",
                "repositories_url": f"{base}/installation/repositories",
                "html_url": f"https://github.com/settings/installations/{installation}", "permissions": PERMISSIONS,
                "events": ["issue_comment", "pull_request_review_comment"], "single_file_name": None,
                "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z"}

    async def get_app(self, request: web.Request) -> web.Response:
        """GET /app: the App its JSON web token authenticates."""
        app = request[APP]
        return web.json_response({
            "id": app.id, "slug": app.slug, "node_id": "A_1", "name": app.slug, "description": "",
            "owner": {"login": "octo", "id": 1, "type": "User"}, "external_url": "https://example.com",
            "html_url": f"https://github.com/apps/{app.slug}", "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z", "permissions": PERMISSIONS,
            "events": ["issue_comment", "pull_request_review_comment"]})

    async def repo_installation(self, request: web.Request) -> web.Response:
        app, full_name = request[APP], f"{request.match_info['owner']}/{request.match_info['name']}"
        installation = next((i for i, repos in app.installations.items() if full_name in repos), None)
        if installation is None:
            return error(404, "Not Found", "/apps/apps#get-a-repository-installation-for-the-authenticated-app")
        return web.json_response(self._installation_json(app, installation))

    async def create_token(self, request: web.Request) -> web.Response:
        app, installation = request[APP], int(request.match_info["id"])
        if installation not in app.installations:
            return error(404, "Not Found", "/apps/apps#create-an-installation-access-token-for-an-app")
        token = "ghs_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(36))
        expires_at = int(time.time() + self.api.token_lifetime_s)
        self.issued.append(IssuedToken(token, installation, time.time(), expires_at))
        self.api.tokens[token] = app.bot
        at = datetime.datetime.fromtimestamp(expires_at, datetime.UTC)
        return web.json_response({"token": token, "expires_at": f"{at:%Y-%m-%dT%H:%M:%SZ}", "permissions": PERMISSIONS,
                                  "repository_selection": "selected"}, status=201)
