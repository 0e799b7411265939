"""The GitHub forge as a GitHub App: a JSON web token signed with the App's key, an installation token for the
repository, refreshed before it expires; against the fake GitHub, which checks each as GitHub does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.settings import ConfigError
from common.untrusted import OURS
from servers.github.clients import Clients
from servers.github.config import Secret, Settings
from servers.github.forge import ForgeError, ForgeUnavailable
from servers.github.remote import GitHubForge
from tests.fakes.github_api import FakeGitHub
from tests.servers.github.test_remote import changes

APP_ID = 424242
LIFETIME_S = 22  # PyGithub refreshes an installation token 20 s before it expires: after ~2 s here


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    api = FakeGitHub()
    api.add_repo("octo/demo", {"README.md": "# demo\n"})
    api.add_repo("octo/other", {"README.md": "# other\n"})
    api.apps.add(APP_ID, PUBLIC)
    api.apps.install(APP_ID, "octo/demo")
    api.token_lifetime_s = LIFETIME_S
    await api.start()
    yield api
    await api.stop()


def app_forge(api: FakeGitHub, repo: str = "octo/demo", key: str = pem(KEY)) -> GitHubForge:
    settings = Settings(app_id=str(APP_ID), app_private_key=Secret(key), api_url=api.base_url, write_interval_s=0)
    return GitHubForge(repo, Clients(settings))


def token_of(request: object) -> str:
    return getattr(request, "headers").get("Authorization", "").partition(" ")[2]


async def test_an_app_commits_and_opens_a_pull_request_and_refreshes_its_token_before_it_expires(
        fake: FakeGitHub) -> None:
    gh, base = app_forge(fake), fake.repos["octo/demo"].refs["main"]
    info = await gh.get_repository()
    assert info.can_push, "an installation writes to the repository itself, not a fork"
    first = await gh.commit_changes("tb/app", "Add a", changes(base, {"a.txt": b"a"}))
    pr = await gh.open_pull_request("tb/app", None, "Add a", "", False)
    assert fake.repos["octo/demo"].refs["tb/app"] == first.sha and pr.number == 1
    assert not [r for r in fake.requests if r.path.endswith("/forks")]
    jwt_requests = [r for r in fake.requests if r.headers.get("Authorization", "").startswith("Bearer ")]
    assert [r.path for r in jwt_requests] == ["/repos/octo/demo/installation", "/app/installations/1/access_tokens"]
    [old] = fake.apps.issued
    assert {token_of(r) for r in fake.requests if r not in jwt_requests} == {old.token}

    async with asyncio.timeout(10):  # until PyGithub holds the token about to expire
        while time.time() < old.expires_at - 20:
            await asyncio.sleep(0.05)
    old.expires_at = int(time.time())  # and the fake holds it expired: any use of it now answers 401
    refresh_point = time.time()
    second = await gh.commit_changes("tb/app", "Add b", changes(base, {"a.txt": b"a", "b.txt": b"b"}).model_copy(
        update={"parent": first.sha}))
    assert fake.repos["octo/demo"].refs["tb/app"] == second.sha
    assert len(fake.apps.issued) == 2 and fake.apps.issued[1].token != old.token
    later = [r for r in fake.requests if r.at >= refresh_point and not r.path.startswith("/app/")]
    assert later and {token_of(r) for r in later} == {fake.apps.issued[1].token}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake.base_url}/repos/octo/demo",
                               headers={"Authorization": f"token {old.token}"}) as answer:
            assert (answer.status, (await answer.json())["message"]) == (401, "Bad credentials")


async def test_an_app_not_installed_on_the_repository_is_a_clear_error(fake: FakeGitHub) -> None:
    with pytest.raises(ForgeError, match=f"GitHub App {APP_ID} is not installed on octo/other: install it"):
        await app_forge(fake, "octo/other").get_repository()
    assert not fake.apps.issued


async def test_a_key_that_is_not_the_apps_is_a_clear_error_naming_the_variable(fake: FakeGitHub) -> None:
    other = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(ForgeUnavailable, match=r"A JSON web token could not be decoded.*GITHUB_APP_PRIVATE_KEY") \
            as caught:
        await app_forge(fake, key=other).get_repository()
    assert other not in str(caught.value) and not fake.apps.issued


async def test_a_key_that_cannot_sign_is_a_clear_error_naming_the_variable(fake: FakeGitHub) -> None:
    with pytest.raises(ForgeUnavailable, match="GITHUB_APP_PRIVATE_KEY cannot sign"):
        await app_forge(fake, key="-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n") \
            .get_repository()
    assert not fake.requests


def test_a_private_key_that_is_no_rsa_pem_key_is_refused_when_the_settings_are_read() -> None:
    garbage = "-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----"
    with pytest.raises(ConfigError, match="GITHUB_APP_PRIVATE_KEY") as caught:
        Settings.from_env({"GITHUB_APP_ID": "1", "GITHUB_APP_PRIVATE_KEY": garbage})
    assert "bm90IGEga2V5" not in str(caught.value)
    assert Settings.from_env({"GITHUB_APP_ID": "1", "GITHUB_APP_PRIVATE_KEY": pem(KEY)}).app_private_key is not None


@pytest.mark.parametrize(("claims", "status", "message"), [
    ({"iss": APP_ID, "iat": -60, "exp": 540}, 201, None),
    ({"iss": str(APP_ID), "iat": -60, "exp": 300}, 201, None),
    ({"iss": APP_ID, "iat": -60, "exp": 600}, 401, "'Expiration time' claim ('exp') is too far in the future"),
    ({"iss": APP_ID, "iat": -600, "exp": -10}, 401, "'Expiration time' claim ('exp') must be a numeric value"),
    ({"iss": 7, "iat": -60, "exp": 300}, 404, "Integration not found"),
])
async def test_the_fake_checks_the_apps_json_web_token_as_github_does(fake: FakeGitHub, claims: dict[str, int],
                                                                     status: int, message: str | None) -> None:
    now = int(time.time())
    payload = claims | {"iat": now + claims["iat"], "exp": now + claims["exp"]}
    token = jwt.api_jws.encode(json.dumps(payload).encode(), KEY, algorithm="RS256")  # `iss` a number, as Octokit
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.base_url}/app/installations/1/access_tokens",
                                headers={"Authorization": f"Bearer {token}"}) as answer:
            body = await answer.json()
    assert answer.status == status
    if message is None:
        assert body["token"].startswith("ghs_") and body["expires_at"].endswith("Z")
        assert set(body) == {"token", "expires_at", "permissions", "repository_selection"}
    else:
        assert body["message"].startswith(message)


async def test_the_apps_own_comments_are_its_bots_and_a_persons_holding_the_mark_are_not(fake: FakeGitHub) -> None:
    gh = app_forge(fake)
    fake.add_issue("octo/demo", 7, "Bug", "It breaks", [])
    spoof = fake.conversations.add_issue_comment("octo/demo", 7, "Working on it\n\n" + OURS, author="mallory")
    made = await gh.comment_on_issue(7, "Working on it: http://tb/runs/1")
    assert (made.author, made.ours) == ("tiny-backspace[bot]", True)
    issue = await gh.get_issue(7)
    assert [(c.author, c.ours) for c in issue.comments] == [("mallory", False), ("tiny-backspace[bot]", True)]
    with pytest.raises(ForgeError, match=r"written by mallory, not by Tiny Backspace \(tiny-backspace\[bot\]\)"):
        await gh.edit_issue_comment(spoof["id"], "Taken over")
    assert (await gh.edit_issue_comment(made.id, "Done")).ours
    # Who the App is comes from GET /app, with its JSON web token, once; an installation is no user (no GET /user).
    [asked] = [r for r in fake.requests if r.path == "/app"]
    assert asked.headers["Authorization"].startswith("Bearer ")
    assert not [r for r in fake.requests if r.path == "/user"]


async def test_an_installation_token_reaches_only_the_repositories_of_its_installation(fake: FakeGitHub) -> None:
    await app_forge(fake).get_repository()
    [issued] = fake.apps.issued
    async with aiohttp.ClientSession(headers={"Authorization": f"token {issued.token}"}) as session:
        async def status(path: str) -> tuple[int, str]:
            async with session.get(fake.base_url + path) as answer:
                body = await answer.json()
                return answer.status, body.get("message", "") if isinstance(body, dict) else ""

        answers = [await status(path) for path in ("/repos/octo/demo", "/repos/octo/other",
                                                   "/repos/octo/other/git/ref/heads/main", "/user")]
    assert [a[0] for a in answers] == [200, 404, 404, 403]
    assert answers[1][1] == "Not Found" and answers[3][1] == "Resource not accessible by integration"
