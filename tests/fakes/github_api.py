"""A fake GitHub REST API on loopback, for the real PyGithub to talk to.

It implements the endpoints the github server uses, with the status codes, headers and bodies GitHub documents
(docs.github.com/rest: repos, forks, git blobs/trees/commits/refs, pulls, issues, rate limits, Apps), and records
every request so tests can check what a client sent. What real GitHub does to clients, it can do too: forks that are
copied asynchronously (empty until `fork_delay_s` has passed: their git data and commits answer 409, their contents
404, and no pull request comes from them), secondary rate limits (`secondary`), lists in pages, repositories without
draft pull requests, installation tokens that expire and reach only their installation's repositories. It also
serves clones: each repository's objects and refs are written into a real bare repository, its `clone_url`.

Where GitHub's documentation does not give the status an answer has, the fake says so where it answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .git_objects import Commit, ObjectStore
from .github_app import APP, Apps
from .github_conversation import Conversations
from .github_json import FakeRepo, commit_json, error, paginated, ref_json, repo_json

LOGIN = web.RequestKey("login", str)
INSTALLATION = web.RequestKey("installation", bool)  # set when the request's token is an App installation's
WRITES = {"POST", "PATCH", "PUT", "DELETE"}
_REPO_PATH = re.compile(r"^/repos/([^/]+)/([^/]+)(/.*)?$")
SECONDARY_LIMIT = ("You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you "
                   "reach out to GitHub Support for help, please include the request ID 0000:0000:0000000:0000000:0.")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)


@dataclass
class SecondaryRateLimit:
    """Which requests answer with a secondary rate limit: every `every`-th counted request, and the `next` counted
    ones; counted are writes (GitHub's "content-creating requests") or, with `writes_only` False, all. GitHub answers
    them 403 or 429 (`status`), with `retry-after` when it says how long to wait (`retry_after`, None: no header)."""

    every: int = 0
    next: int = 0
    writes_only: bool = True
    status: int = 403
    retry_after: int | None = 1
    counted: int = 0

    def applies(self, method: str) -> bool:
        if self.writes_only and method not in WRITES:
            return False
        self.counted += 1
        if self.next > 0:
            self.next -= 1
            return True
        return bool(self.every) and self.counted % self.every == 0


class FakeGitHub:
    """State and HTTP face of the fake API; `start()` serves it and returns the base URL."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.repos: dict[str, FakeRepo] = {}
        self.pulls: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[Recorded] = []
        self.rate_limit_exhausted = False
        self.secondary = SecondaryRateLimit()
        self.rate_limited: list[Recorded] = []  # the requests answered with a secondary rate limit
        self.fork_delay_s = 0.0
        self.token_lifetime_s = 3600.0
        self.lose_responses: list[tuple[str, str]] = []
        self.latency_s = 0.0  # how long each request takes to be answered
        self.in_flight: dict[str, int] = {}  # credential (token or JWT) -> requests being answered now
        self.most_in_flight: dict[str, int] = {}  # credential -> most requests it had being answered at once
        self.base_url = ""
        self.clones: Path | None = None  # where the bare repositories behind each `clone_url` are, once started
        self.conversations = Conversations(self)
        self.apps = Apps(self)
        self._runner: web.AppRunner | None = None

    def add_repo(self, full_name: str, files: dict[str, str], *, pushers: set[str] = frozenset(),
                 drafts_supported: bool = True) -> FakeRepo:
        """A repository with one commit holding `files` on `main`."""
        owner, name = full_name.split("/")
        repo = FakeRepo(owner, name, ObjectStore(), pushers=set(pushers), drafts_supported=drafts_supported)
        repo.refs["main"] = repo.store.commit_files({p: t.encode() for p, t in files.items()}, [], "initial")
        self.repos[full_name] = repo
        self.pulls[full_name] = []
        return repo

    def add_issue(self, full_name: str, number: int, title: str, body: str, labels: list[str]) -> None:
        """An open issue as GET /repos/{owner}/{repo}/issues/{number} returns it."""
        url = f"{self.base_url}/repos/{full_name}/issues/{number}"
        self.repos[full_name].issues[number] = {
            "id": number, "node_id": "I_1", "url": url, "number": number, "state": "open", "title": title,
            "body": body, "html_url": f"https://github.com/{full_name}/issues/{number}",
            "labels": [{"id": i, "name": name, "color": "ededed"} for i, name in enumerate(labels)],
            "user": {"login": "reporter", "id": 2, "type": "User"}, "created_at": "2024-01-01T00:00:00Z"}

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        r = "/repos/{owner}/{name}"
        app.add_routes([
            web.get(r, self.get_repo), web.post(r + "/forks", self.create_fork),
            web.get(r + "/git/ref/heads/{branch:.+}", self.get_ref), web.post(r + "/git/refs", self.create_ref),
            web.get(r + "/git/refs", self.list_refs), web.get(r + "/contents/{path:.*}", self.get_contents),
            web.patch(r + "/git/refs/heads/{branch:.+}", self.update_ref),
            web.get(r + "/git/commits/{sha}", self.get_commit), web.post(r + "/git/commits", self.create_commit),
            web.post(r + "/git/blobs", self.create_blob), web.post(r + "/git/trees", self.create_tree),
            web.get(r + "/pulls", self.list_pulls), web.post(r + "/pulls", self.create_pull),
            web.get(r + "/issues/{number}", self.get_issue), web.get("/user", self.get_user),
        ])
        app.add_routes(self.conversations.routes())
        app.add_routes(self.apps.routes())
        self.clones = Path(tempfile.mkdtemp(prefix="fake-github-clones-"))
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self.clones is not None:
            shutil.rmtree(self.clones, ignore_errors=True)
            self.clones = None

    def clone_url(self, repo: FakeRepo) -> str:
        """The file:// URL of the bare repository that mirrors `repo` (GitHub's own clone URL before start())."""
        if self.clones is None:
            return ""
        return (self.clones / f"{repo.full_name}.git").as_uri()

    def repo_json(self, repo: FakeRepo, login: str) -> dict[str, Any]:
        """GET /repos/{owner}/{repo} as `login` sees it, its clone_url the mirror's."""
        return repo_json(self.base_url, repo, login, self.clone_url(repo))

    def mirror(self, full_name: str) -> Path:
        """Write the repository's objects, branches and pull request heads (refs/pull/<n>/head) into its bare
        repository, HEAD naming its default branch; a fork still being copied has no refs yet. Its git dir."""
        assert self.clones is not None, "start() the fake first"
        repo = self.repos[full_name]
        refs = {} if self._copying(repo) else {f"refs/heads/{b}": sha for b, sha in repo.refs.items()}
        for pull in self.pulls.get(full_name, []):
            head = self.repos.get(pull["head"]["repo"]["full_name"])
            sha = head.refs.get(pull["head"]["ref"], pull["head"]["sha"]) if head else pull["head"]["sha"]
            refs[f"refs/pull/{pull['number']}/head"] = sha
        git_dir = self.clones / f"{full_name}.git"
        repo.store.mirror(git_dir, refs, repo.default_branch)
        return git_dir

    @staticmethod
    def _copying(repo: FakeRepo) -> bool:
        return time.monotonic() < repo.ready_at

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body))
        credential = request.headers.get("Authorization", "").partition(" ")[2]
        self.in_flight[credential] = self.in_flight.get(credential, 0) + 1
        self.most_in_flight[credential] = max(self.most_in_flight.get(credential, 0), self.in_flight[credential])
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await self._answer(request, handler)
        finally:
            self.in_flight[credential] -= 1

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        reset = str(int(time.time()) + 3600)
        limits = {"X-RateLimit-Limit": "5000", "X-RateLimit-Reset": reset, "X-RateLimit-Resource": "core"}
        if self.rate_limit_exhausted:
            response = error(403, "API rate limit exceeded for user ID 1. If you reach out to GitHub Support for "
                             "help, please include the request ID.", "/using-the-rest-api/rate-limits-for-the-rest-api")
            response.headers.update(limits | {"X-RateLimit-Remaining": "0", "X-RateLimit-Used": "5000"})
            return response
        refused = self._authenticate(request)
        if refused is not None:
            return refused
        if self.secondary.applies(request.method):
            self.rate_limited.append(self.requests[-1])
            status = self.secondary.status
            response = error(status, SECONDARY_LIMIT,
                             "/using-the-rest-api/rate-limits-for-the-rest-api#about-secondary-rate-limits")
            response.headers.update(limits | {"X-RateLimit-Remaining": "4990", "X-RateLimit-Used": "10"})
            if self.secondary.retry_after is not None:
                response.headers["Retry-After"] = str(self.secondary.retry_after)
            return response
        empty = self._empty(request)
        if empty is not None:
            return empty
        response = await handler(request)
        response.headers.update(limits | {"X-RateLimit-Remaining": "4999", "X-RateLimit-Used": "1"})
        for rule in self.lose_responses:
            if rule[0] == request.method and request.path.endswith(rule[1]):
                # The action happened but its answer is lost: what makes clients retry a POST.
                self.lose_responses.remove(rule)
                return error(502, "Server Error")
        return response

    def _empty(self, request: web.Request) -> web.Response | None:
        """What a fork GitHub is still copying (after answering POST /forks) answers instead: its git data and
        commits 409 "Git Repository is empty." (as GitHub answers for an empty repository), its contents 404 "This
        repository is empty." (what GitHub answers an empty repository's contents, though its docs list no such
        body); None when the request is not for such a fork."""
        match = _REPO_PATH.match(request.path)
        repo = self.repos.get(f"{match[1]}/{match[2]}") if match else None
        if repo is None or not self._copying(repo):
            return None
        rest = match[3] or ""
        if rest.startswith(("/git/", "/commits")):
            return error(409, "Git Repository is empty.", "/git/refs#get-a-reference")
        if rest.startswith("/contents"):
            return error(404, "This repository is empty.", "/repos/contents#get-repository-content")
        return None

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the request's credentials are good: the App's JWT on App endpoints, else a token the fake
        knows that has not expired; an installation's token reaches only the repositories of its installation
        (any other answers 404, as a repository the installation cannot see)."""
        auth = request.headers.get("Authorization", "")
        if self.apps.wants_jwt(request):
            app = self.apps.verify(auth)
            if isinstance(app, web.Response):
                return app
            request[APP] = app
            return None
        kind, _, token = auth.partition(" ")
        if kind.lower() not in ("token", "bearer") or token not in self.tokens or self.apps.expired(token):
            return error(401, "Bad credentials" if auth else "Requires authentication")
        request[LOGIN] = self.tokens[token]
        reach = self.apps.reach(token)
        match = _REPO_PATH.match(request.path)
        if reach is not None:
            request[INSTALLATION] = True
            if match and f"{match[1]}/{match[2]}" not in reach:
                return error(404, "Not Found")
        return None

    def _repo(self, request: web.Request) -> FakeRepo | None:
        return self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")

    def _writable(self, request: web.Request) -> FakeRepo | web.Response:
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found")
        if request[LOGIN] not in repo.pushers:
            return error(403, "Resource not accessible by personal access token")
        return repo

    async def get_repo(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found", "/repos/repos#get-a-repository")
        self.mirror(repo.full_name)
        return web.json_response(self.repo_json(repo, request[LOGIN]))

    async def create_fork(self, request: web.Request) -> web.Response:
        upstream, login = self._repo(request), request[LOGIN]
        if upstream is None:
            return error(404, "Not Found", "/repos/forks#create-a-fork")
        fork = self.repos.get(f"{login}/{upstream.name}")
        if fork is None:
            # Answered at once; the copy takes `fork_delay_s`.
            fork = FakeRepo(login, upstream.name, upstream.store, upstream.default_branch, {login},
                            dict(upstream.refs), upstream, ready_at=time.monotonic() + self.fork_delay_s)
            self.repos[fork.full_name] = fork
            self.pulls[fork.full_name] = []
        return web.json_response(self.repo_json(fork, login), status=202)

    async def get_user(self, request: web.Request) -> web.Response:
        """GET /user: the token's user; an installation's token is no user (GitHub: 403)."""
        if request.get(INSTALLATION):
            return error(403, "Resource not accessible by integration", "/users/users#get-the-authenticated-user")
        login = request[LOGIN]
        return web.json_response({"login": login, "id": sum(map(ord, login)), "node_id": "U_1", "type": "User",
                                  "url": f"{self.base_url}/users/{login}", "html_url": f"https://github.com/{login}"})

    async def list_refs(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/git/refs: every branch, in pages."""
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found", "/git/refs#list-matching-references")
        return paginated(request, [ref_json(self.base_url, repo, b) for b in sorted(repo.refs)])

    async def get_contents(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/contents/{path}?ref=: a file on the default branch (or `ref`), base64."""
        repo = self._repo(request)
        ref = request.query.get("ref", repo.default_branch if repo else "")
        sha = repo.refs.get(ref, ref) if repo else ""
        files = repo.store.flatten(repo.store.commits[sha].tree) if repo and sha in repo.store.commits else {}
        path = request.match_info["path"]
        if path not in files:
            return error(404, "Not Found", "/repos/contents#get-repository-content")
        data = repo.store.blobs[files[path][1]]
        return web.json_response({"type": "file", "encoding": "base64", "size": len(data), "name": path.split("/")[-1],
                                  "path": path, "sha": files[path][1], "content": base64.b64encode(data).decode(),
                                  "url": f"{self.base_url}/repos/{repo.full_name}/contents/{path}"})

    async def get_ref(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None or request.match_info["branch"] not in repo.refs:
            return error(404, "Not Found", "/git/refs#get-a-reference")
        return web.json_response(ref_json(self.base_url, repo, request.match_info["branch"]))

    async def create_ref(self, request: web.Request) -> web.Response:
        repo = self._writable(request)
        if isinstance(repo, web.Response):
            return repo
        body = await request.json()
        ref, sha = body.get("ref", ""), body.get("sha", "")
        if not ref.startswith("refs/heads/"):
            return error(422, "Reference name is invalid", "/git/refs#create-a-reference")
        branch = ref.removeprefix("refs/heads/")
        if branch in repo.refs:
            return error(422, "Reference already exists", "/git/refs#create-a-reference")
        if sha not in repo.store.commits:
            return error(422, "Object does not exist", "/git/refs#create-a-reference")
        repo.refs[branch] = sha
        return web.json_response(ref_json(self.base_url, repo, branch), status=201)

    async def update_ref(self, request: web.Request) -> web.Response:
        repo = self._writable(request)
        if isinstance(repo, web.Response):
            return repo
        body, branch = await request.json(), request.match_info["branch"]
        if branch not in repo.refs:
            return error(422, "Reference does not exist", "/git/refs#update-a-reference")
        if body["sha"] not in repo.store.commits:
            return error(422, "Object does not exist", "/git/refs#update-a-reference")
        if not body.get("force") and not repo.store.is_ancestor(repo.refs[branch], body["sha"]):
            return error(422, "Update is not a fast forward", "/git/refs#update-a-reference")
        repo.refs[branch] = body["sha"]
        return web.json_response(ref_json(self.base_url, repo, branch))

    async def get_commit(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None or request.match_info["sha"] not in repo.store.commits:
            return error(404, "Not Found", "/git/commits#get-a-commit-object")
        return web.json_response(commit_json(self.base_url, repo, request.match_info["sha"]))

    async def create_blob(self, request: web.Request) -> web.Response:
        repo = self._writable(request)
        if isinstance(repo, web.Response):
            return repo
        body = await request.json()
        try:
            data = base64.b64decode(body["content"], validate=True) if body.get("encoding") == "base64" \
                else body["content"].encode()
        except (binascii.Error, KeyError):
            return error(422, "Validation Failed", "/git/blobs#create-a-blob")
        sha = repo.store.add_blob(data)
        return web.json_response({"sha": sha, "url": f"{self.base_url}/repos/{repo.full_name}/git/blobs/{sha}"},
                                 status=201)

    async def create_tree(self, request: web.Request) -> web.Response:
        repo = self._writable(request)
        if isinstance(repo, web.Response):
            return repo
        body = await request.json()
        base = body.get("base_tree")
        if base is not None and base not in repo.store.trees:
            return error(422, "Invalid tree info", "/git/trees#create-a-tree")
        files = repo.store.flatten(base) if base else {}
        for entry in body["tree"]:
            path, mode = entry["path"], entry["mode"]
            if "content" in entry:
                files[path] = (mode, repo.store.add_blob(entry["content"].encode()))
            elif entry.get("sha") is None:
                # GitHub documents a null sha as deleting the path.
                files = {p: v for p, v in files.items() if p != path and not p.startswith(path + "/")}
            elif entry["sha"] not in repo.store.blobs or mode not in ("100644", "100755", "120000"):
                return error(422, "Invalid tree info", "/git/trees#create-a-tree")
            else:
                files[path] = (mode, entry["sha"])
        sha = repo.store.build(files)
        url = f"{self.base_url}/repos/{repo.full_name}/git/trees/{sha}"
        return web.json_response({"sha": sha, "url": url, "truncated": False, "tree": [
            {"path": name, "mode": mode, "type": "tree" if mode == "040000" else "blob", "sha": s}
            for mode, name, s in repo.store.trees[sha]]}, status=201)

    async def create_commit(self, request: web.Request) -> web.Response:
        repo = self._writable(request)
        if isinstance(repo, web.Response):
            return repo
        body = await request.json()
        if body["tree"] not in repo.store.trees or any(p not in repo.store.commits for p in body["parents"]):
            return error(422, "Tree SHA does not exist", "/git/commits#create-a-commit")
        sha = repo.store.add_commit(Commit(tree=body["tree"], parents=body["parents"], message=body["message"],
                                           author=request[LOGIN]))
        return web.json_response(commit_json(self.base_url, repo, sha), status=201)

    async def list_pulls(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found", "/pulls/pulls#list-pull-requests")
        state, head = request.query.get("state", "open"), request.query.get("head")
        found = [p for p in self.pulls[repo.full_name]
                 if (state == "all" or p["state"] == state) and (head is None or p["head"]["label"] == head)]
        return paginated(request, found)

    async def create_pull(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found", "/pulls/pulls#create-a-pull-request")
        body, doc = await request.json(), "/pulls/pulls#create-a-pull-request"
        if body.get("draft") and not repo.drafts_supported:
            return error(422, "Draft pull requests are not supported in this repository.", doc)
        owner, _, branch = body["head"].rpartition(":")
        head_repo = self.repos.get(f"{owner}/{repo.name}") if owner else repo
        label = f"{head_repo.owner if head_repo else owner}:{branch}"
        if body["base"] not in repo.refs:
            return error(422, "Validation Failed", doc, errors=[{"resource": "PullRequest", "field": "base",
                                                                 "code": "invalid"}])
        # A fork still being copied has no branches yet: GitHub's answer is assumed to be the one for a missing head.
        if head_repo is None or branch not in head_repo.refs or self._copying(head_repo):
            return error(422, "Validation Failed", doc, errors=[{"resource": "PullRequest", "field": "head",
                                                                 "code": "invalid"}])
        if any(p["head"]["label"] == label and p["state"] == "open" for p in self.pulls[repo.full_name]):
            return error(422, "Validation Failed", doc, errors=[{"resource": "PullRequest", "code": "custom",
                                                                 "message": f"A pull request already exists for "
                                                                            f"{label}."}])
        number = len(self.pulls[repo.full_name]) + sum(1 for _ in repo.issues) + 1
        url = f"{self.base_url}/repos/{repo.full_name}/pulls/{number}"
        side = lambda r, b: {"label": f"{r.owner}:{b}", "ref": b, "sha": r.refs[b],  # noqa: E731
                             "user": {"login": r.owner}, "repo": self.repo_json(r, request[LOGIN])}
        pull = {"url": url, "id": number, "node_id": "PR_1", "number": number, "state": "open",
                "html_url": f"https://github.com/{repo.full_name}/pull/{number}", "title": body.get("title", ""),
                "body": body.get("body"), "draft": bool(body.get("draft", False)), "user": {"login": request[LOGIN]},
                "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z", "merged": False,
                "maintainer_can_modify": bool(body.get("maintainer_can_modify", False)),
                "head": side(head_repo, branch), "base": side(repo, body["base"])}
        self.pulls[repo.full_name].append(pull)
        return web.json_response(pull, status=201)

    async def get_issue(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        issue = repo.issues.get(int(request.match_info["number"])) if repo else None
        if repo is None or issue is None:
            return error(404, "Not Found", "/issues/issues#get-an-issue")
        return web.json_response(issue)
