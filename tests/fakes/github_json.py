"""The shapes of GitHub's REST resources (repository, git reference, git commit, error), as the docs give them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .git_objects import ObjectStore

DOCS = "https://docs.github.com/rest"


@dataclass
class FakeRepo:
    owner: str
    name: str
    store: ObjectStore
    default_branch: str = "main"
    pushers: set[str] = field(default_factory=set)
    refs: dict[str, str] = field(default_factory=dict)
    parent: FakeRepo | None = None
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)
    drafts_supported: bool = True  # False: the plan has no draft pull requests (GitHub Free, private repositories)
    ready_at: float = 0.0  # time.monotonic() when a fork's copy is done; before, its git data answers 409

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


def error(status: int, message: str, doc: str = "", **extra: Any) -> web.Response:
    """An error body shaped as GitHub sends them."""
    return web.json_response({"message": message, "documentation_url": f"{DOCS}{doc}", "status": str(status)}
                             | extra, status=status)


def paginated(request: web.Request, items: list[Any]) -> web.Response:
    """A list endpoint's answer as GitHub pages it: `per_page` (default 30, at most 100) and `page` (from 1) in the
    query, and a `Link` header with the `next`, `last`, `first` and `prev` pages that exist."""
    try:
        per_page = min(100, max(1, int(request.query.get("per_page", "30"))))
        number = max(1, int(request.query.get("page", "1")))
    except ValueError:
        return error(422, "Validation Failed")
    last = max(1, -(-len(items) // per_page))
    links = {"first": 1, "prev": number - 1} if number > 1 else {}
    if number < last:
        links |= {"next": number + 1, "last": last}
    header = ", ".join(f'<{request.url.update_query(page=str(n), per_page=str(per_page))}>; rel="{rel}"'
                       for rel, n in links.items())
    response = web.json_response(items[(number - 1) * per_page:number * per_page])
    if header:
        response.headers["Link"] = header
    return response


def repo_json(base_url: str, repo: FakeRepo, login: str, clone_url: str = "") -> dict[str, Any]:
    """GET /repos/{owner}/{repo}, with `permissions` as `login` holds them (an App installation, `…[bot]`, gets none:
    its access is the App's)."""
    url = f"{base_url}/repos/{repo.full_name}"
    push = login in repo.pushers
    data = {"id": hash(repo.full_name) % 10**8, "node_id": "R_1", "name": repo.name, "full_name": repo.full_name,
            "owner": {"login": repo.owner, "id": 1, "type": "User"}, "private": False,
            "html_url": f"https://github.com/{repo.full_name}", "url": url,
            "clone_url": clone_url or f"https://github.com/{repo.full_name}.git",
            "default_branch": repo.default_branch, "fork": repo.parent is not None}
    if not login.endswith("[bot]"):
        data["permissions"] = {"admin": push, "maintain": push, "push": push, "triage": push, "pull": True}
    if repo.parent:
        data["parent"] = repo_json(base_url, repo.parent, login)
    return data


def ref_json(base_url: str, repo: FakeRepo, branch: str) -> dict[str, Any]:
    """GET /repos/{owner}/{repo}/git/ref/heads/{branch}."""
    url = f"{base_url}/repos/{repo.full_name}/git"
    sha = repo.refs[branch]
    return {"ref": f"refs/heads/{branch}", "node_id": "REF_1", "url": f"{url}/refs/heads/{branch}",
            "object": {"type": "commit", "sha": sha, "url": f"{url}/commits/{sha}"}}


def commit_json(base_url: str, repo: FakeRepo, sha: str) -> dict[str, Any]:
    """GET /repos/{owner}/{repo}/git/commits/{sha}."""
    c = repo.store.commits[sha]
    url = f"{base_url}/repos/{repo.full_name}/git"
    person = {"name": c.author, "email": "test@example.com", "date": c.date}
    return {"sha": sha, "node_id": "C_1", "url": f"{url}/commits/{sha}", "author": person, "committer": person,
            "message": c.message, "tree": {"sha": c.tree, "url": f"{url}/trees/{c.tree}"},
            "parents": [{"sha": p, "url": f"{url}/commits/{p}"} for p in c.parents],
            "verification": {"verified": False, "reason": "unsigned", "signature": None, "payload": None}}
