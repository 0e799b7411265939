"""A fake GitHub REST API on loopback, for the real PyGithub to talk to.

It implements the endpoints the github server uses, with the status codes, headers and bodies GitHub documents
(docs.github.com/rest: repos, forks, git blobs/trees/commits/refs, pulls, issues, rate limits), and records every
request so tests can check what a client sent.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .git_objects import Commit, ObjectStore
from .github_conversation import Conversations
from .github_json import FakeRepo, commit_json, error, ref_json, repo_json

LOGIN = web.RequestKey("login", str)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeGitHub:
    """State and HTTP face of the fake API; `start()` serves it and returns the base URL."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.repos: dict[str, FakeRepo] = {}
        self.pulls: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[Recorded] = []
        self.rate_limit_exhausted = False
        self.lose_responses: list[tuple[str, str]] = []
        self.base_url = ""
        self.conversations = Conversations(self)
        self._runner: web.AppRunner | None = None

    def add_repo(self, full_name: str, files: dict[str, str], *, pushers: set[str] = frozenset()) -> FakeRepo:
        """A repository with one commit holding `files` on `main`."""
        owner, name = full_name.split("/")
        repo = FakeRepo(owner, name, ObjectStore(), pushers=set(pushers))
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
            web.patch(r + "/git/refs/heads/{branch:.+}", self.update_ref),
            web.get(r + "/git/commits/{sha}", self.get_commit), web.post(r + "/git/commits", self.create_commit),
            web.post(r + "/git/blobs", self.create_blob), web.post(r + "/git/trees", self.create_tree),
            web.get(r + "/pulls", self.list_pulls), web.post(r + "/pulls", self.create_pull),
            web.get(r + "/issues/{number}", self.get_issue),
        ])
        app.add_routes(self.conversations.routes())
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

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body))
        reset = str(int(time.time()) + 3600)
        limits = {"X-RateLimit-Limit": "5000", "X-RateLimit-Reset": reset, "X-RateLimit-Resource": "core"}
        if self.rate_limit_exhausted:
            response = error(403, "API rate limit exceeded for user ID 1. If you reach out to GitHub Support for "
                             "help, please include the request ID.", "/using-the-rest-api/rate-limits-for-the-rest-api")
            response.headers.update(limits | {"X-RateLimit-Remaining": "0", "X-RateLimit-Used": "5000"})
            return response
        auth = request.headers.get("Authorization", "")
        kind, _, token = auth.partition(" ")
        if kind.lower() not in ("token", "bearer") or token not in self.tokens:
            return error(401, "Bad credentials" if auth else "Requires authentication")
        request[LOGIN] = self.tokens[token]
        response = await handler(request)
        response.headers.update(limits | {"X-RateLimit-Remaining": "4999", "X-RateLimit-Used": "1"})
        for rule in self.lose_responses:
            if rule[0] == request.method and request.path.endswith(rule[1]):
                # The action happened but its answer is lost: what makes clients retry a POST.
                self.lose_responses.remove(rule)
                return error(502, "Server Error")
        return response

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
        return web.json_response(repo_json(self.base_url, repo, request[LOGIN]))

    async def create_fork(self, request: web.Request) -> web.Response:
        upstream, login = self._repo(request), request[LOGIN]
        if upstream is None:
            return error(404, "Not Found", "/repos/forks#create-a-fork")
        fork = self.repos.get(f"{login}/{upstream.name}")
        if fork is None:
            fork = FakeRepo(login, upstream.name, upstream.store, upstream.default_branch, {login},
                            dict(upstream.refs), upstream)
            self.repos[fork.full_name] = fork
            self.pulls[fork.full_name] = []
        return web.json_response(repo_json(self.base_url, fork, login), status=202)

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
        return web.json_response(found)

    async def create_pull(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found", "/pulls/pulls#create-a-pull-request")
        body, doc = await request.json(), "/pulls/pulls#create-a-pull-request"
        owner, _, branch = body["head"].rpartition(":")
        head_repo = self.repos.get(f"{owner}/{repo.name}") if owner else repo
        label = f"{head_repo.owner if head_repo else owner}:{branch}"
        if body["base"] not in repo.refs:
            return error(422, "Validation Failed", doc, errors=[{"resource": "PullRequest", "field": "base",
                                                                 "code": "invalid"}])
        if head_repo is None or branch not in head_repo.refs:
            return error(422, "Validation Failed", doc, errors=[{"resource": "PullRequest", "field": "head",
                                                                 "code": "invalid"}])
        if any(p["head"]["label"] == label and p["state"] == "open" for p in self.pulls[repo.full_name]):
            return error(422, "Validation Failed", doc, errors=[{"resource": "PullRequest", "code": "custom",
                                                                 "message": f"A pull request already exists for "
                                                                            f"{label}."}])
        number = len(self.pulls[repo.full_name]) + sum(1 for _ in repo.issues) + 1
        url = f"{self.base_url}/repos/{repo.full_name}/pulls/{number}"
        side = lambda r, b: {"label": f"{r.owner}:{b}", "ref": b, "sha": r.refs[b],  # noqa: E731
                             "user": {"login": r.owner}, "repo": repo_json(self.base_url, r, request[LOGIN])}
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
