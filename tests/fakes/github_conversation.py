"""The fake GitHub REST API's conversations: a pull request read whole with its files, issue comments, pull request
review comments and replies, collaborator permissions, and branch deletion (docs.github.com/rest/pulls/pulls,
/pulls/comments, /issues/comments, /collaborators/collaborators, /git/refs).

Comment ids are unique across the fake. Pull requests are issues too: their numbers take issue comments. Every list
is paged as GitHub pages it (`paginated`).
"""

from __future__ import annotations

import datetime
import difflib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .github_json import FakeRepo, error, paginated

if TYPE_CHECKING:
    from .github_api import FakeGitHub

MAX_BODY_CHARS = 65_536
# The legacy base role `permission` gives for each role GitHub names in `role_name` (maintain reads as write,
# triage as read).
BASE_ROLES = {"admin": "admin", "maintain": "write", "write": "write", "triage": "read", "read": "read",
              "none": "none"}
_RANK = ["none", "read", "triage", "write", "maintain", "admin"]


@dataclass
class Stored:
    """One comment: where it is, and the JSON GitHub answers for it."""

    repo: str
    number: int
    kind: str  # "issue" or "review"
    json: dict[str, Any]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Conversations:
    """What people wrote on the fake's issues and pull requests, and who may write to which repository."""

    def __init__(self, api: FakeGitHub) -> None:
        self.api = api
        self.comments: dict[int, Stored] = {}
        # repository -> login -> role name (admin, maintain, write, triage, read, none, or a custom role) and the
        # base role of a custom one
        self.roles: dict[str, dict[str, tuple[str, str]]] = {}
        self._ids = itertools.count(1_000_001)

    # Test helpers: what people do on GitHub's pages.

    def add_issue_comment(self, full_name: str, number: int, body: str, author: str = "reviewer",
                          created_at: str | None = None) -> dict[str, Any]:
        """A comment by `author` in the conversation of issue or pull request `number`."""
        repo = self.api.repos[full_name]
        if not self._is_issue(repo, number):
            raise KeyError(f"{full_name} has no issue or pull request #{number}")
        return self._add_issue_comment(repo, number, body, author, created_at)

    def add_review_comment(self, full_name: str, number: int, path: str, line: int | None, body: str,
                           author: str = "reviewer", in_reply_to: int | None = None,
                           created_at: str | None = None) -> dict[str, Any]:
        """A review comment by `author` on `path` at `line` of pull request `number`'s head, or a reply under the
        review comment `in_reply_to`."""
        repo = self.api.repos[full_name]
        pull = self._pull(repo, number)
        if pull is None:
            raise KeyError(f"{full_name} has no pull request #{number}")
        root = self._review_root(repo, number, in_reply_to) if in_reply_to is not None else None
        if in_reply_to is not None and root is None:
            raise KeyError(f"pull request #{number} has no review comment {in_reply_to} to reply to")
        return self._add_review_comment(repo, pull, body, author, path, line, root, created_at)

    def set_permission(self, full_name: str, login: str, role: str, base: str | None = None) -> None:
        """Give `login` a role in the repository (a custom role needs its `base` role); write roles may push."""
        if role not in BASE_ROLES and base not in BASE_ROLES:
            raise ValueError(f"custom role {role!r} needs a base role out of {sorted(BASE_ROLES)}")
        self.roles.setdefault(full_name, {})[login] = (role, BASE_ROLES.get(role) or BASE_ROLES[str(base)])
        pushers = self.api.repos[full_name].pushers
        if _RANK.index(role if role in BASE_ROLES else str(base)) >= _RANK.index("write"):
            pushers.add(login)
        else:
            pushers.discard(login)

    def of(self, full_name: str, number: int, kind: str = "issue") -> list[dict[str, Any]]:
        """The comments of one kind ("issue" or "review") on issue or pull request `number`, oldest first."""
        return [s.json for s in self.comments.values() if (s.repo, s.number, s.kind) == (full_name, number, kind)]

    def routes(self) -> list[web.RouteDef]:
        r = "/repos/{owner}/{name}"
        return [
            web.get(r + r"/pulls/{number:\d+}", self.get_pull),
            web.get(r + r"/pulls/{number:\d+}/files", self.list_files),
            web.get(r + r"/pulls/{number:\d+}/comments", self.list_review_comments),
            web.get(r + r"/pulls/comments/{id:\d+}", self.get_review_comment),
            web.post(r + r"/pulls/{number:\d+}/comments/{id:\d+}/replies", self.reply),
            web.get(r + r"/issues/{number:\d+}/comments", self.list_issue_comments),
            web.post(r + r"/issues/{number:\d+}/comments", self.create_issue_comment),
            web.get(r + r"/issues/comments/{id:\d+}", self.get_issue_comment),
            web.patch(r + r"/issues/comments/{id:\d+}", self.edit_issue_comment),
            web.get(r + "/collaborators/{user}/permission", self.get_permission),
            web.delete(r + "/git/refs/heads/{branch:.+}", self.delete_ref),
        ]

    # Lookups.

    def _repo(self, request: web.Request) -> FakeRepo | None:
        return self.api.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")

    def _pull(self, repo: FakeRepo, number: int) -> dict[str, Any] | None:
        return next((p for p in self.api.pulls.get(repo.full_name, []) if p["number"] == number), None)

    def _is_issue(self, repo: FakeRepo, number: int) -> bool:
        return number in repo.issues or self._pull(repo, number) is not None

    def _stored(self, repo: FakeRepo, comment_id: int, kind: str) -> Stored | None:
        stored = self.comments.get(comment_id)
        return stored if stored is not None and (stored.repo, stored.kind) == (repo.full_name, kind) else None

    def _review_root(self, repo: FakeRepo, number: int, comment_id: int) -> dict[str, Any] | None:
        stored = self._stored(repo, comment_id, "review")
        if stored is None or stored.number != number:
            return None
        return stored.json

    def _role(self, repo: FakeRepo, login: str) -> tuple[str, str] | None:
        """(role_name, permission) of `login`, or None for a login the fake knows nothing of."""
        if login in self.roles.get(repo.full_name, {}):
            return self.roles[repo.full_name][login]
        if login == repo.owner:
            return "admin", "admin"
        if login in repo.pushers:
            return "write", "write"
        known = set(self.api.tokens.values()) | {r.owner for r in self.api.repos.values()} \
            | {s.json["user"]["login"] for s in self.comments.values()} \
            | {name for roles in self.roles.values() for name in roles}
        # The fake's repositories are public: anyone may read them.
        return ("read", "read") if login in known else None

    def _user(self, login: str) -> dict[str, Any]:
        return {"login": login, "id": sum(map(ord, login)), "node_id": "U_1", "type": "Bot" if login.endswith("[bot]")
                else "User", "url": f"{self.api.base_url}/users/{login}", "html_url": f"https://github.com/{login}"}

    def _association(self, repo: FakeRepo, login: str) -> str:
        if login == repo.owner:
            return "OWNER"
        return "COLLABORATOR" if login in repo.pushers or login in self.roles.get(repo.full_name, {}) else "NONE"

    # Comments as GitHub stores them.

    def _add_issue_comment(self, repo: FakeRepo, number: int, body: str, author: str,
                           created_at: str | None) -> dict[str, Any]:
        cid, at = next(self._ids), created_at or now()
        page = "pull" if self._pull(repo, number) is not None else "issues"
        api = f"{self.api.base_url}/repos/{repo.full_name}"
        data = {"id": cid, "node_id": f"IC_{cid}", "url": f"{api}/issues/comments/{cid}",
                "html_url": f"https://github.com/{repo.full_name}/{page}/{number}#issuecomment-{cid}",
                "body": body, "user": self._user(author), "created_at": at, "updated_at": at,
                "issue_url": f"{api}/issues/{number}", "author_association": self._association(repo, author)}
        self.comments[cid] = Stored(repo.full_name, number, "issue", data)
        return data

    def _add_review_comment(self, repo: FakeRepo, pull: dict[str, Any], body: str, author: str, path: str,
                            line: int | None, root: dict[str, Any] | None, created_at: str | None) -> dict[str, Any]:
        cid, at, number = next(self._ids), created_at or now(), pull["number"]
        api = f"{self.api.base_url}/repos/{repo.full_name}"
        commit = root["commit_id"] if root else self._side_sha(pull["head"])
        if root is not None:
            path, line = root["path"], root["line"]
        url = f"{api}/pulls/comments/{cid}"
        data = {"url": url, "pull_request_review_id": cid, "id": cid, "node_id": f"PRRC_{cid}",
                "diff_hunk": f"@@ -{line or 1},1 +{line or 1},1 @@", "path": path, "position": line,
                "original_position": line, "commit_id": commit, "original_commit_id": commit,
                "user": self._user(author), "body": body, "created_at": at, "updated_at": at,
                "html_url": f"https://github.com/{repo.full_name}/pull/{number}#discussion_r{cid}",
                "pull_request_url": f"{api}/pulls/{number}", "author_association": self._association(repo, author),
                "_links": {"self": {"href": url}, "html": {"href": f"https://github.com/{repo.full_name}/pull/"
                                                                   f"{number}#discussion_r{cid}"},
                           "pull_request": {"href": f"{api}/pulls/{number}"}},
                "start_line": None, "original_start_line": None, "start_side": None, "line": line,
                "original_line": line, "side": "RIGHT", "subject_type": "line"}
        if root is not None:
            data["in_reply_to_id"] = root["id"]
        self.comments[cid] = Stored(repo.full_name, number, "review", data)
        return data

    def _side_sha(self, side: dict[str, Any]) -> str:
        """Where a pull request's head or base is now: the branch's tip, or the last one known once it is gone."""
        repo = self.api.repos.get(side["repo"]["full_name"]) if side.get("repo") else None
        return repo.refs.get(side["ref"], side["sha"]) if repo is not None else side["sha"]

    # Pull requests.

    async def get_pull(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/pulls/{pull_number}."""
        repo = self._repo(request)
        pull = self._pull(repo, int(request.match_info["number"])) if repo else None
        if repo is None or pull is None:
            return error(404, "Not Found", "/pulls/pulls#get-a-pull-request")
        number, api = pull["number"], f"{self.api.base_url}/repos/{repo.full_name}"
        return web.json_response(pull | {
            "head": pull["head"] | {"sha": self._side_sha(pull["head"])},
            "base": pull["base"] | {"sha": self._side_sha(pull["base"])},
            "issue_url": f"{api}/issues/{number}", "comments_url": f"{api}/issues/{number}/comments",
            "review_comments_url": f"{api}/pulls/{number}/comments", "commits_url": f"{api}/pulls/{number}/commits",
            "diff_url": f"https://github.com/{repo.full_name}/pull/{number}.diff",
            "patch_url": f"https://github.com/{repo.full_name}/pull/{number}.patch",
            "comments": len(self.of(repo.full_name, number)),
            "review_comments": len(self.of(repo.full_name, number, "review")),
            "author_association": self._association(repo, pull["user"]["login"]),
            "labels": [], "assignees": [], "requested_reviewers": [], "mergeable": None, "merged_at": None})

    async def list_files(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/pulls/{pull_number}/files: what the head changed since it left the base."""
        repo = self._repo(request)
        pull = self._pull(repo, int(request.match_info["number"])) if repo else None
        if repo is None or pull is None:
            return error(404, "Not Found", "/pulls/pulls#list-pull-requests-files")
        store = repo.store
        head, base = self._side_sha(pull["head"]), self._side_sha(pull["base"])
        since = merge_base(repo, base, head)
        old = store.flatten(store.commits[since].tree) if since else {}
        new = store.flatten(store.commits[head].tree)
        files = []
        for path in sorted(set(old) | set(new)):
            if old.get(path) == new.get(path):
                continue
            status = "added" if path not in old else "removed" if path not in new else "modified"
            before = store.blobs[old[path][1]] if path in old else b""
            after = store.blobs[new[path][1]] if path in new else b""
            sha = (new.get(path) or old[path])[1]
            raw = f"https://github.com/{repo.full_name}/raw/{head}/{path}"
            entry: dict[str, Any] = {
                "sha": sha, "filename": path, "status": status, "additions": 0, "deletions": 0, "changes": 0,
                "blob_url": f"https://github.com/{repo.full_name}/blob/{head}/{path}", "raw_url": raw,
                "contents_url": f"{self.api.base_url}/repos/{repo.full_name}/contents/{path}?ref={head}"}
            patch = text_patch(before, after)
            if patch is not None:  # GitHub leaves `patch` out for binary files
                entry["patch"] = patch
                lines = patch.split("\n")
                entry["additions"] = sum(1 for x in lines if x.startswith("+"))
                entry["deletions"] = sum(1 for x in lines if x.startswith("-"))
                entry["changes"] = entry["additions"] + entry["deletions"]
            files.append(entry)
        return paginated(request, files)

    # Review comments.

    async def list_review_comments(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/pulls/{pull_number}/comments, in ascending order of id."""
        repo = self._repo(request)
        number = int(request.match_info["number"])
        if repo is None or self._pull(repo, number) is None:
            return error(404, "Not Found", "/pulls/comments#list-review-comments-on-a-pull-request")
        return paginated(request, self.of(repo.full_name, number, "review"))

    async def get_review_comment(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/pulls/comments/{comment_id}."""
        repo = self._repo(request)
        stored = self._stored(repo, int(request.match_info["id"]), "review") if repo else None
        if stored is None:
            return error(404, "Not Found", "/pulls/comments#get-a-review-comment-for-a-pull-request")
        return web.json_response(stored.json)

    async def reply(self, request: web.Request) -> web.Response:
        """POST /repos/{owner}/{repo}/pulls/{pull_number}/comments/{comment_id}/replies."""
        from .github_api import LOGIN

        doc = "/pulls/comments#create-a-reply-for-a-review-comment"
        repo = self._repo(request)
        number = int(request.match_info["number"])
        pull = self._pull(repo, number) if repo else None
        root = self._review_root(repo, number, int(request.match_info["id"])) if repo and pull else None
        # The docs list 201 and 404 only, and say a reply must go to a thread's first comment ("Replies to replies
        # are not supported"); what GitHub answers a reply to a reply they do not say: 404 is an assumption.
        if repo is None or pull is None or root is None or "in_reply_to_id" in root:
            return error(404, "Not Found", doc)
        body = (await request.json()).get("body")
        if problem := body_problem(body, "PullRequestReviewComment"):
            return problem
        return web.json_response(self._add_review_comment(repo, pull, body, request[LOGIN], "", None, root, None),
                                 status=201)

    # Issue comments.

    async def list_issue_comments(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/issues/{issue_number}/comments, oldest first."""
        repo = self._repo(request)
        number = int(request.match_info["number"])
        if repo is None or not self._is_issue(repo, number):
            return error(404, "Not Found", "/issues/comments#list-issue-comments")
        return paginated(request, self.of(repo.full_name, number))

    async def create_issue_comment(self, request: web.Request) -> web.Response:
        """POST /repos/{owner}/{repo}/issues/{issue_number}/comments: anyone may comment on a public repository."""
        from .github_api import LOGIN

        repo = self._repo(request)
        number = int(request.match_info["number"])
        if repo is None or not self._is_issue(repo, number):
            return error(404, "Not Found", "/issues/comments#create-an-issue-comment")
        body = (await request.json()).get("body")
        if problem := body_problem(body, "IssueComment"):
            return problem
        return web.json_response(self._add_issue_comment(repo, number, body, request[LOGIN], None), status=201)

    async def get_issue_comment(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/issues/comments/{comment_id}."""
        repo = self._repo(request)
        stored = self._stored(repo, int(request.match_info["id"]), "issue") if repo else None
        if stored is None:
            return error(404, "Not Found", "/issues/comments#get-an-issue-comment")
        return web.json_response(stored.json)

    async def edit_issue_comment(self, request: web.Request) -> web.Response:
        """PATCH /repos/{owner}/{repo}/issues/comments/{comment_id}: by its author or someone who can write."""
        from .github_api import LOGIN

        repo = self._repo(request)
        stored = self._stored(repo, int(request.match_info["id"]), "issue") if repo else None
        if repo is None or stored is None:
            return error(404, "Not Found", "/issues/comments#update-an-issue-comment")
        login = request[LOGIN]
        if login != stored.json["user"]["login"] and login not in repo.pushers:
            return error(403, "Resource not accessible by personal access token",
                         "/issues/comments#update-an-issue-comment")
        body = (await request.json()).get("body")
        if problem := body_problem(body, "IssueComment"):
            return problem
        stored.json |= {"body": body, "updated_at": now()}
        return web.json_response(stored.json)

    # Collaborators and branches.

    async def get_permission(self, request: web.Request) -> web.Response:
        """GET /repos/{owner}/{repo}/collaborators/{username}/permission."""
        repo = self._repo(request)
        login = request.match_info["user"]
        role = self._role(repo, login) if repo else None
        if repo is None or role is None:
            return error(404, "Not Found", "/collaborators/collaborators#get-repository-permissions-for-a-user")
        role_name, permission = role
        rank = _RANK.index(role_name if role_name in BASE_ROLES else permission)
        flags = {"pull": rank >= 1, "triage": rank >= 2, "push": rank >= 3, "maintain": rank >= 4, "admin": rank >= 5}
        return web.json_response({"permission": permission, "role_name": role_name,
                                  "user": self._user(login) | {"permissions": flags, "role_name": role_name}})

    async def delete_ref(self, request: web.Request) -> web.Response:
        """DELETE /repos/{owner}/{repo}/git/refs/heads/{branch}: 204, or 422 when there is no such reference."""
        from .github_api import LOGIN

        doc = "/git/refs#delete-a-reference"
        repo = self._repo(request)
        if repo is None:
            return error(404, "Not Found", doc)
        if request[LOGIN] not in repo.pushers:
            return error(403, "Resource not accessible by personal access token", doc)
        if repo.refs.pop(request.match_info["branch"], None) is None:
            return error(422, "Reference does not exist", doc)
        return web.Response(status=204)


def body_problem(body: Any, resource: str) -> web.Response | None:
    """GitHub's 422 for a comment body that is missing, empty or longer than it stores."""
    if not isinstance(body, str) or not body:
        return error(422, "Validation Failed", errors=[{"resource": resource, "code": "missing_field",
                                                        "field": "body"}])
    if len(body) > MAX_BODY_CHARS:
        return error(422, "Validation Failed", errors=[{
            "resource": resource, "code": "custom", "field": "body",
            "message": f"body is too long (maximum is {MAX_BODY_CHARS} characters)"}])
    return None


def merge_base(repo: FakeRepo, base: str, head: str) -> str | None:
    """The newest commit of `head`'s history that `base` holds too (what GitHub compares a pull request with)."""
    todo, seen = [head], set()
    while todo:
        sha = todo.pop(0)
        if sha in seen or sha not in repo.store.commits:
            continue
        if repo.store.is_ancestor(sha, base):
            return sha
        seen.add(sha)
        todo += repo.store.commits[sha].parents
    return None


def text_patch(before: bytes, after: bytes) -> str | None:
    """The hunks of a unified diff as GitHub's `patch` holds them (no file header), or None for binary content."""
    try:
        old, new = before.decode(), after.decode()
    except UnicodeDecodeError:
        return None
    if "\x00" in old or "\x00" in new:
        return None
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm=""))
    return "\n".join(lines[2:])
