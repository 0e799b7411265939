"""What every endpoint checks of a request and how it answers: the body read within bounds, `POST /code`'s fields
validated into a `RunRequest`, refusals as `{"error": ...}` saying what to do, answers redacted like the stream.
The app's handlers (app.py) and the pull request pages (pulls.py) share it."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from aiohttp import web

from common import repos
from common.redact import Redactor

from .guard import refuse
from .run import RunRequest, Services
from .runs import NotAdmitted, RunManager

RUNS = web.AppKey("runs", RunManager)
REDACT = web.AppKey("redact", Redactor)
LOOPBACK = web.AppKey("loopback", bool)
MAX_BODY = 256 * 1024
# What POST /code accepts; anything else is refused.
FIELDS = ("repoUrl", "prompt", "mode", "on_disconnect", "setup", "attempts", "issue", "pull_request")
NUMBER_MAX = 2**31 - 1  # GitHub's issue and pull request numbers are 32-bit
# An issue's URL given as the prompt: the run resolves that issue.
ISSUE_URL = re.compile(r"https://([^/\s]+)/([^/\s]+)/([^/\s]+)/issues/([0-9]{1,10})/?")
SETUP_CHARS = 20_000  # the sandbox server's own limit on a setup script
# C0 and C1 controls and DEL: text that git, terminals and pull requests refuse or act on. Newline, tab and carriage
# return are text.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
C0_NAMES = ("NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC FS "
            "GS RS US").split()


def bad_request(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def not_admitted(client: str, exc: NotAdmitted, services: Services) -> web.Response:
    """The answer to a run that cannot start now: which limit, and when to try again."""
    settings = services.settings
    if exc.reason == "rate":
        return refuse(429, f"too many runs started from {client}; retry in {math.ceil(exc.wait_s)} s", exc.wait_s)
    if exc.reason == "client":
        return refuse(429, f"{client} already has {settings.max_runs_per_client} runs in flight "
                           "(TB_MAX_RUNS_PER_CLIENT); wait for one to finish", exc.wait_s)
    if exc.reason == "draining":
        return refuse(503, "this replica is shutting down and starts no new runs; retry: another replica (or this "
                           "one, restarted) takes it", exc.wait_s)
    return refuse(503, f"the service is running {settings.max_runs} runs (TB_MAX_RUNS); retry shortly", exc.wait_s)


def redacted_json(request: web.Request, data: Any) -> web.Response:
    """A JSON answer that passes the same redaction as the event stream (a prompt may hold a secret)."""
    redact = request.app[REDACT]
    return web.json_response(data, dumps=lambda obj: redact(json.dumps(obj, ensure_ascii=False)))


def validate(body: Any, services: Services, loopback: bool) -> RunRequest | web.Response:
    """The run a request asks for, or the 4xx response that says what is wrong with it."""
    if not isinstance(body, dict):
        return bad_request('the body must be a JSON object: {"repoUrl": "...", "prompt": "..."}')
    if unknown := sorted(str(name)[:60] for name in body if name not in FIELDS):
        return bad_request(f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown[:10])}"
                           f"{', …' if len(unknown) > 10 else ''}; the accepted fields are {', '.join(FIELDS)}")
    repo, prompt = body.get("repoUrl"), body.get("prompt")
    if not isinstance(repo, str) or not repo.strip():
        return bad_request("repoUrl must be a non-empty string: a GitHub repository URL or a local repository path")
    numbers = {}
    for name, what in (("issue", "the number of the issue to resolve"),
                       ("pull_request", "the number of the pull request to follow up")):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= NUMBER_MAX):
            return bad_request(f"{name} must be a whole number from 1: {what}")
        numbers[name] = value
    if numbers["issue"] is not None and numbers["pull_request"] is not None:
        return bad_request("give issue or pull_request, not both: a run resolves an issue (and opens a pull request "
                           "for it) or follows up a pull request")
    task = numbers["issue"] or numbers["pull_request"]
    if prompt is None and task:
        prompt = ""
    elif task and not isinstance(prompt, str):
        return bad_request("prompt, when given with issue or pull_request, must be a string: what to do besides "
                           "what the issue or the pull request's review comments ask")
    elif not isinstance(prompt, str) or not (prompt.strip() or task):
        return bad_request('prompt must be a non-empty string saying what to change (or give "issue": N to resolve '
                           'an issue, or "pull_request": N to follow up a pull request)')
    limit = services.settings.max_prompt_chars
    if len(prompt) > limit:
        return bad_request(f"prompt is {len(prompt)} characters, over the limit of {limit} (TB_MAX_PROMPT_CHARS)",
                           413)
    setup = body.get("setup")
    if setup is not None and not isinstance(setup, str):
        return bad_request('setup must be a string: a bash script that installs the repository\'s dependencies, or "" '
                           "for no setup")
    if setup is not None and len(setup) > SETUP_CHARS:
        return bad_request(f"setup is {len(setup)} characters, over the limit of {SETUP_CHARS}", 413)
    for name, value in (("repoUrl", repo), ("prompt", prompt), ("setup", setup or "")):
        if refused := control_character(name, value):
            return refused
    mode = body.get("mode", "team")
    if mode not in ("team", "single"):
        return bad_request('mode must be "team" (planner, coder, reviewer) or "single" (one agent)')
    if body.get("on_disconnect", "continue") not in ("continue", "cancel"):
        return bad_request('on_disconnect must be "continue" (the run goes on) or "cancel"')
    attempts, most = body.get("attempts", 1), services.settings.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= most:
        return bad_request(f"attempts must be a whole number from 1 to {most} (TB_MAX_ATTEMPTS): how many coders work "
                           "on the plan at once, each in a sandbox of its own, for the reviewer to choose from")
    if attempts > 1 and mode != "team":
        return bad_request('attempts above 1 need mode "team": the reviewer chooses between the attempts')
    hosts = services.settings.github_hosts
    forms = (f"repoUrl must be owner/name, https://HOST/owner/name with HOST one of {', '.join(hosts)} "
             "(TB_GITHUB_HOSTS), or an absolute path or file:// URL of a local git repository")
    try:
        ref = repos.parse(repo, hosts)
    except repos.RepoError as exc:
        return bad_request(f"{forms}: {exc}")
    if ref.kind == "https":
        return bad_request(f"{forms}: {ref.host} is not one of the GitHub hosts")
    named = issue_url(prompt, hosts)
    if named is not None:
        if task:
            return bad_request("the prompt is an issue's URL, which starts a run on that issue: give it alone, "
                               "without issue or pull_request")
        if ref.kind == "github" and named[0].lower() != ref.full_name.lower():
            return bad_request(f"the prompt is the URL of issue #{named[1]} of {named[0]}, but repoUrl names "
                               f"{ref.full_name}: a run resolves an issue in the issue's own repository; give that "
                               "repository as repoUrl")
        numbers["issue"], prompt = named[1], ""
    if ref.kind == "local" and numbers["issue"] is not None:
        return bad_request("local repositories have no issues: put the task in the prompt instead")
    if ref.kind == "local":
        local = ref.path.resolve()
        roots = services.settings.local_roots
        if not loopback and not any(local == r or r in local.parents for r in roots):
            return bad_request("local repositories are accepted only while the service listens on loopback, or "
                               "under a root listed in TB_LOCAL_ROOTS", 403)
        if not (local / ".git").exists() and not (local / "HEAD").is_file():
            return bad_request(f"{local} is not a git repository")
    return RunRequest(repo_url=str(local if ref.kind == "local" else ref), prompt=prompt, mode=mode, setup=setup,
                      attempts=attempts, **numbers)


def issue_url(prompt: str, hosts: tuple[str, ...]) -> tuple[str, int] | None:
    """(owner/name, number) when the whole prompt is the URL of an issue on one of the GitHub `hosts`."""
    found = ISSUE_URL.fullmatch(prompt.strip())
    if found is None:
        return None
    host, owner, name, number = found.groups()
    host = host.lower()
    if host not in hosts and not (host == "www.github.com" and "github.com" in hosts):
        return None
    named = repos.owner_name(f"{owner}/{name}")
    return (f"{named[0]}/{named[1]}", int(number)) if named and int(number) >= 1 else None


def control_character(name: str, value: str) -> web.Response | None:
    """The 400 for the first control character in a field, naming it and where it is; None when there is none."""
    found = CONTROL.search(value)
    if found is None:
        return None
    code = ord(found[0])
    label = C0_NAMES[code] if code < len(C0_NAMES) else "DEL" if code == 0x7F else None
    shown = f"U+{code:04X}" + (f" ({label})" if label else "")
    return bad_request(f"{name} holds the control character {shown} at offset {found.start()} (counting from 0): "
                       "remove it; of the control characters only newline, tab and carriage return are accepted")


async def read_json(request: web.Request, example: str, optional: bool = False) -> Any:
    """The request's JSON body, or the 4xx response that says what is wrong with it; `optional`: no body is {}."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return bad_request(f"the body is over {MAX_BODY} bytes", 413)
    timeout = request.app[RUNS].services.settings.client_timeout_s
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
        return {} if optional and not raw.strip() else json.loads(raw)
    except TimeoutError:
        return bad_request(f"the body did not arrive within {timeout:g} s (TB_CLIENT_TIMEOUT_S); send it whole", 408)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return bad_request(f"the body is not JSON; send {example}")
    except RecursionError:
        return bad_request(f"the body nests too deeply; send {example}")
    except web.HTTPRequestEntityTooLarge:
        return bad_request(f"the body is over {MAX_BODY} bytes", 413)


