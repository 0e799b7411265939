"""A local repository's pull requests over HTTP, for the page and the CLI: list, read with the diff, comment, close.

Each handler is one or two calls of the github server's MCP tools through the service's tool pool; the repository
passes the same checks as `POST /code`. A follow-up on a pull request is a run: `POST /code` with `pull_request`.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from .intake import LOOPBACK, REDACT, RUNS, bad_request, control_character, read_json, redacted_json, validate
from .mcp_pool import ServerUnavailable
from .run import RunRequest
from .tools import result_text

MAX_NUMBER = 2**31 - 1  # what the forges count pull requests and lines in
CALL_SECONDS = 120.0  # a page waits for an answer: a read or one comment, never a command
STATES = ("open", "closed", "all")
NOT_FOUND = re.compile(r"\bno pull request\b|\bnot found\b|\bdoes not exist\b", re.IGNORECASE)
SDK_PREFIX = re.compile(r"^Error executing tool \w+: ")  # what the MCP SDK puts before a tool's own message


def local_repository(request: web.Request) -> str | web.Response:
    """The local repository `?repo=` names, checked as `POST /code` checks a repository; or the 4xx refusing it."""
    repo = request.query.get("repo", "")
    if not repo.strip():
        return bad_request("add ?repo= with the path of a local git repository (as given to POST /code)")
    run = validate({"repoUrl": repo, "prompt": "pull requests"}, request.app[RUNS].services, request.app[LOOPBACK])
    if isinstance(run, web.Response):
        return run
    assert isinstance(run, RunRequest)
    if not run.repo_url.startswith("/"):
        return bad_request(f"{run.repo_url} is a GitHub repository: open its pull requests on GitHub; this service "
                           "shows those of local repositories")
    return run.repo_url


def pull_number(request: web.Request) -> int | web.Response:
    """The pull request number in the path, or the 400 refusing it."""
    raw = request.match_info["number"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and 1 <= int(raw) <= MAX_NUMBER):
        return bad_request(f"{raw[:40]!r} is no pull request number: use the whole number the list shows (GET "
                           "/pulls?repo=...)")
    return int(raw)


async def call(request: web.Request, tool: str, arguments: dict[str, Any]) -> dict[str, Any] | web.Response:
    """A github tool's answer, or the response that passes its refusal on: the forge's own message, 404 when it
    finds no such pull request, 502/504 when the server cannot be reached."""
    pool = request.app[RUNS].services.pool
    if tool not in {t.name for t in pool.tools().get("github", [])}:
        return bad_request(f"the github MCP server has no tool {tool} (or is down): update or restart it", 502)
    timeout = min(CALL_SECONDS, request.app[RUNS].services.settings.limits.tool_seconds)
    try:
        result = await pool.call("github", tool, arguments, timeout)
    except TimeoutError:
        return bad_request(f"the github MCP server did not answer {tool} within {timeout:g} s; try again", 504)
    except ServerUnavailable as exc:
        return bad_request(f"{exc}; try again shortly", 502)
    if result.is_error:
        message = SDK_PREFIX.sub("", result_text(result))
        return bad_request(message, 404 if NOT_FOUND.search(message) else 400)
    return result.structured_content or {}


async def list_pulls(request: web.Request) -> web.Response:
    """`GET /pulls?repo=R[&state=open|closed|all]`: the repository's pull requests, oldest first."""
    repo = local_repository(request)
    if isinstance(repo, web.Response):
        return repo
    state = request.query.get("state", "open")
    if state not in STATES:
        return bad_request('state must be "open" (the default), "closed" or "all"')
    answer = await call(request, "list_pull_requests", {"repo": repo, "state": state})
    return answer if isinstance(answer, web.Response) else redacted_json(request, answer | {"repo": repo})


async def get_pull(request: web.Request) -> web.Response:
    """`GET /pulls/{n}?repo=R`: one pull request with its description, comments, review threads and diff."""
    repo, number = local_repository(request), pull_number(request)
    for refused in (repo, number):
        if isinstance(refused, web.Response):
            return refused
    answer = await call(request, "get_pull_request", {"repo": repo, "number": number, "diff": True})
    return answer if isinstance(answer, web.Response) else redacted_json(request, answer | {"repo": repo})


async def add_comment(request: web.Request) -> web.Response:
    """`POST /pulls/{n}/comments?repo=R` `{"body", "path"?, "line"?}`: a person's comment, on a line of a file when
    `path` and `line` are given."""
    repo, number = local_repository(request), pull_number(request)
    for refused in (repo, number):
        if isinstance(refused, web.Response):
            return refused
    example = '{"body": "...", "path": "file.py", "line": 3} (path and line are optional)'
    body = await read_json(request, example)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict) or (unknown := set(body) - {"body", "path", "line"}):
        return bad_request(f"unknown fields {', '.join(sorted(map(str, unknown)))[:200]}; send {example}"
                           if isinstance(body, dict) else f"send {example}")
    text, path, line = body.get("body"), body.get("path"), body.get("line")
    if not isinstance(text, str) or not text.strip():
        return bad_request(f"body must be a non-empty string: the comment, as plain text or Markdown; send {example}")
    # How long a comment may be is the github server's to say (add_review_comment refuses a longer one).
    if path is not None and (not isinstance(path, str) or not path.strip() or len(path) > 4096):
        return bad_request("path must be a file's path relative to the repository root, e.g. src/app.py, or absent")
    if line is not None and (isinstance(line, bool) or not isinstance(line, int) or not 1 <= line <= MAX_NUMBER):
        return bad_request("line must be a line number of the file, from 1, or absent")
    if line is not None and path is None:
        return bad_request("a line needs the path of its file: send path too, or no line")
    for name, value in (("body", text), ("path", path or "")):
        if refused := control_character(name, value):
            return refused
    # Stored and shown by the forge: what the service keeps secret stays out of it, as out of everything it writes.
    arguments = {"repo": repo, "number": number, "body": request.app[REDACT](text), "path": path, "line": line}
    answer = await call(request, "add_review_comment", arguments)
    return answer if isinstance(answer, web.Response) else redacted_json(request, answer)


async def close_pull(request: web.Request) -> web.Response:
    """`POST /pulls/{n}/close?repo=R`: delete the pull request's branch (one under the server's prefix), which
    closes it."""
    repo, number = local_repository(request), pull_number(request)
    for refused in (repo, number):
        if isinstance(refused, web.Response):
            return refused
    body = await read_json(request, "no body (or {})", optional=True)
    if isinstance(body, web.Response):
        return body
    if body != {}:
        return bad_request("send no body (or {}): closing deletes the pull request's branch")
    pull = await call(request, "get_pull_request", {"repo": repo, "number": number, "diff": False})
    if isinstance(pull, web.Response):
        return pull
    deleted = await call(request, "delete_branch", {"repo": repo, "branch": pull["head"]})
    if isinstance(deleted, web.Response):
        return deleted
    after = await call(request, "get_pull_request", {"repo": repo, "number": number, "diff": False})
    if isinstance(after, web.Response):
        return after
    return redacted_json(request, {"number": number, "head": pull["head"], "deleted": bool(deleted.get("deleted")),
                                   "state": after.get("state"), "url": after.get("url")})
