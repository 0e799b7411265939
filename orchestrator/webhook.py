"""`POST /github/webhook`: a comment that mentions the service's handle on an issue or pull request, by someone who
may write to the repository, starts a run; an answer comment links the run and is edited with its outcome.

What a delivery must pass, in order: GITHUB_WEBHOOK_SECRET is set (else 503), the body is signed with it
(`X-Hub-Signature-256`, else 401), the event is a comment just created (else 202 ignored; `ping` is answered 200),
the comment is fresh (TB_WEBHOOK_MAX_AGE_S, else 400), not the service's own, mentions @TB_GITHUB_HANDLE outside code
and quotes (else 202 ignored), is the first delivery of its id and of its comment (else 200 with the first one's run),
and its author can write to the repository (else 202 ignored: no run, no comment). Then the run starts under the
client key `github:<owner/name>`, so the admission limits apply per repository; a refusal is answered with a comment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from common import repos
from common.redact import Redactor
from common.untrusted import OURS, clean

from .intake import not_admitted
from .run import PUBLISH_CALL_SECONDS, RunRequest
from .runs import NotAdmitted, RunManager
from .tools import result_text

log = logging.getLogger(__name__)
HANDLED = ("issue_comment", "pull_request_review_comment")
ANSWERS_GRACE_S = 30  # at shutdown, answer comments still being written get this long
MESSAGE_CHARS = 1000  # of a run's error, in the answer comment

# What a mention inside is not one: fenced code blocks, inline code spans, quoted lines.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?(?:^ {0,3}\1[`~]*[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
_QUOTE = re.compile(r"^ {0,3}>.*$", re.MULTILINE)


def mentions(body: str, handle: str) -> list[tuple[int, int]]:
    """Where `body` mentions @handle (any case, as a whole login) outside code and `>` quotes, as (start, end)."""
    masked = body
    for pattern in (_FENCE, _CODE_SPAN, _QUOTE):
        masked = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), masked)
    mention = re.compile(rf"(?<![\w@/.-])@{re.escape(handle)}(?![\w-])", re.IGNORECASE)
    return [m.span() for m in mention.finditer(masked)]


def request_text(body: str, spans: list[tuple[int, int]]) -> str:
    """The comment without its mentions: what the commenter asks for."""
    for start, end in reversed(spans):
        end += 1 if body[end:end + 1] in (",", ":") else 0
        body = body[:start] + body[end:]
    return re.sub(r"[ \t]{2,}", " ", body).strip().lstrip(",:;-").strip()


def sign(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends with `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _get(data: Any, *path: str) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _answer(status: int, **data: Any) -> web.Response:
    return web.json_response(data, status=status)


class Refused(Exception):
    """A delivery this service will not act on; the message says why, `status` is the HTTP one."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Webhook:
    """The handler of GitHub's deliveries, and the answer comments that follow their runs."""

    def __init__(self, runs: RunManager, max_body: int):
        self.runs = runs
        self.settings = runs.services.settings
        self.max_body = max_body
        self.redact = Redactor()
        self.answers: set[asyncio.Task] = set()

    def install(self, app: web.Application) -> None:
        """Serve POST /github/webhook on `app`; at its cleanup, answers still being written finish (bounded)."""
        app.router.add_post("/github/webhook", self.handle)
        app.on_startup.append(self.conclude_left)
        self.runs.recovered.append(lambda run_ids: self._spawn(self._conclude_runs(set(run_ids))))
        app.on_cleanup.append(self.close)

    async def handle(self, request: web.Request) -> web.Response:
        """POST /github/webhook: one delivery, checked, and the run it starts or why none."""
        secret = self.settings.github_webhook_secret
        if not secret:
            return _answer(503, error="the GitHub webhook is off: set GITHUB_WEBHOOK_SECRET to the secret of the "
                                      "repository's (or App's) webhook")
        try:
            raw = await self._body(request)
            given = request.headers.get("X-Hub-Signature-256")
            if given is None:
                raise Refused("unsigned: a delivery must carry X-Hub-Signature-256 (set the webhook's secret to "
                              "GITHUB_WEBHOOK_SECRET)", 401)
            if not hmac.compare_digest(given.encode("utf-8", "replace"), sign(secret, raw).encode()):
                raise Refused("bad signature: X-Hub-Signature-256 is not the HMAC-SHA256 of the body with "
                              "GITHUB_WEBHOOK_SECRET (check that the webhook's secret is the same)", 401)
            event = request.headers.get("X-GitHub-Event", "")
            if event == "ping":
                return _answer(200, pong=True, message=f"the webhook is set up: comments that mention "
                                                       f"@{self.settings.github_handle} start runs")
            if event not in HANDLED:
                return _answer(202, ignored=f"{event or 'an event without X-GitHub-Event'} is not handled; "
                                            f"only {' and '.join(HANDLED)} are")
            try:
                payload = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise Refused("the body is not JSON: set the webhook's content type to application/json") from None
            return await self._comment(request, event, payload)
        except Refused as exc:
            return _answer(exc.status, error=str(exc))

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body:
            raise Refused(f"the body is over {self.max_body} bytes", 413)
        timeout = self.settings.client_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except TimeoutError:
            raise Refused(f"the body did not arrive within {timeout:g} s (TB_CLIENT_TIMEOUT_S)", 408) from None
        except web.HTTPRequestEntityTooLarge:
            raise Refused(f"the body is over {self.max_body} bytes", 413) from None

    async def _comment(self, request: web.Request, event: str, payload: Any) -> web.Response:
        """A signed comment event: the run it asks for, or why none."""
        if _get(payload, "action") != "created":
            return _answer(202, ignored=f"{event} {_get(payload, 'action')!r}: only new comments start runs")
        comment, full_name = _get(payload, "comment"), _get(payload, "repository", "full_name")
        body, created, login = _get(comment, "body"), _get(comment, "created_at"), _get(payload, "sender", "login")
        number = _get(payload, "issue", "number") if event == "issue_comment" else \
            _get(payload, "pull_request", "number")
        comment_id = _get(comment, "id")
        if not all(isinstance(v, str) for v in (body, created, login, full_name)) \
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in (number, comment_id)):
            raise Refused(f"the payload lacks what a GitHub {event} delivery holds: comment.body, comment.id, "
                          "comment.created_at, sender.login, repository.full_name and the issue's or pull "
                          "request's number")
        self._fresh(created)
        handle = self.settings.github_handle
        if login.lower() in (handle.lower(), f"{handle.lower()}[bot]") or _get(payload, "sender", "type") == "Bot" \
                or OURS in body:
            return _answer(202, ignored="the comment is the service's own, or a bot's")
        body = clean(body)
        spans = mentions(body, handle)
        if not spans:
            return _answer(202, ignored=f"the comment does not mention @{handle} (outside code and quotes)")
        try:
            ref = repos.parse(full_name, self.settings.github_hosts)
        except repos.RepoError as exc:
            raise Refused(f"repository.full_name: {exc}") from None
        if ref.kind != "github":
            raise Refused("repository.full_name must be owner/name")
        home = _get(payload, "repository", "html_url")
        try:
            at_home = repos.parse(home, self.settings.github_hosts) if isinstance(home, str) else ref
        except repos.RepoError:
            at_home = None
        if at_home is None or at_home.kind != "github" or at_home.full_name.lower() != ref.full_name.lower():
            raise Refused(f"repository.html_url {str(home)[:200]!r} is not {ref.full_name} on a GitHub host of this "
                          "service (TB_GITHUB_HOSTS): add the host, or point the webhook of that host elsewhere")
        delivery = request.headers.get("X-GitHub-Delivery", "").strip()
        if not delivery or len(delivery) > 100:
            raise Refused("X-GitHub-Delivery is missing or over 100 characters: GitHub names each delivery with a GUID")
        first = await self.runs.store.claim_delivery(delivery, f"{event}:{ref.full_name.lower()}:{comment_id}")
        if first is not None:
            return _answer(200, duplicate=True, run_id=first["run_id"], delivery=first["id"],
                           outcome=first["outcome"] or "the first delivery is being handled")
        pull = event == "pull_request_review_comment" or _get(payload, "issue", "pull_request") is not None
        settled = False
        try:
            answer = await self._start(request, ref, login, number, pull, request_text(body, spans), delivery)
            settled = True
            return answer
        finally:
            if not settled:  # cancelled, or failed: a redelivery gets another chance
                await asyncio.shield(self.runs.store.forget_delivery(delivery))

    def _fresh(self, created: str) -> None:
        try:
            when = datetime.fromisoformat(created)
        except ValueError:
            raise Refused("comment.created_at is not an ISO 8601 time") from None
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        age = (datetime.now(timezone.utc) - when).total_seconds()
        if age > self.settings.webhook_max_age_s:
            raise Refused(f"refused: the comment is {age:.0f} s old, over TB_WEBHOOK_MAX_AGE_S="
                          f"{self.settings.webhook_max_age_s:g}; a stale delivery may be a replay. Comment again to "
                          "start a run")

    async def _start(self, request: web.Request, ref: repos.RepoRef, login: str, number: int, pull: bool, text: str,
                     delivery: str) -> web.Response:
        """Start the run a writer's mention asks for, with its answer comment; refusals are commented too."""
        store, repo, client = self.runs.store, str(ref), f"github:{ref.full_name}"
        try:
            permission = await self._tool("get_permission", {"repo": repo, "user": login})
        except Refused as exc:
            raise Refused(f"could not check @{login}'s permission on {ref.full_name}: {exc}; redeliver to try "
                          "again", 502) from None
        if not permission.get("can_write"):
            why = f"@{login} cannot write to {ref.full_name} ({permission.get('permission', 'none')}): no run"
            await store.settle_delivery(delivery, None, why)
            return _answer(202, ignored=why)
        kind = {"pull_request": number} if pull else {"issue": number}
        # An empty prompt: the issue, or the pull request's threads not yet answered (a run refuses when none is).
        run = RunRequest(repo_url=repo, prompt=text, mode="team", **kind)
        refused = self._refusal(text)
        if refused is None:
            try:
                run_id = await self.runs.start(run, client)
            except NotAdmitted as exc:
                refused = not_admitted(client, exc, self.runs.services)
        if refused is not None:
            await store.forget_delivery(delivery)  # a redelivery may start it later
            self._spawn(self._say(repo, number, f"@{login} I cannot start a run now: "
                                                 f"{json.loads(refused.text)['error']}."))
            return refused
        await store.settle_delivery(delivery, run_id, "started")
        self._spawn(self._follow(delivery, run_id, repo, number, self._link(request, run_id)))
        return _answer(202, run_id=run_id, events_url=f"/runs/{run_id}/events")

    def _refusal(self, text: str) -> web.Response | None:
        """Why the run cannot start (no model, a comment too long), as the HTTP answer; None when it can."""
        services = self.runs.services
        if services.model_problem:
            return _answer(503, error=services.model_problem)
        if len(text) > self.settings.max_prompt_chars:
            return _answer(413, error=f"the comment is {len(text)} characters, over the limit of "
                                      f"{self.settings.max_prompt_chars} (TB_MAX_PROMPT_CHARS)")
        return None

    def _link(self, request: web.Request, run_id: str) -> str:
        base = self.settings.public_url or f"{request.scheme}://{request.host}"
        return f"{base}/#{run_id}"

    async def _follow(self, delivery: str, run_id: str, repo: str, number: int, link: str) -> None:
        """Answer the comment with a link to the run; when the run ends, edit the answer with its outcome. The run
        store knows where the answer is, so that a service restarted meanwhile still gives the outcome."""
        answer = await self._say(repo, number, f"Working on it: [run `{run_id}`]({link}). This comment will say "
                                               "how it ends.")
        await self.runs.store.answering(delivery, repo, number, link, answer)
        async for _ in self.runs.follow(run_id):
            pass
        await self._conclude(delivery, run_id, repo, number, link, answer)

    async def _conclude(self, delivery: str, run_id: str, repo: str, number: int, link: str,
                        answer: int | None) -> None:
        """Edit the answer with the run's outcome (a new comment when it cannot be edited)."""
        outcome = await self._outcome(run_id, link)
        edited = False
        if answer is not None:
            with contextlib.suppress(Refused):
                await self._tool("edit_issue_comment", {"repo": repo, "comment_id": answer, "body": outcome})
                edited = True
        if edited or await self._say(repo, number, outcome) is not None:
            await self.runs.store.answered(delivery)

    async def conclude_left(self, _: web.Application) -> None:
        """At start-up: the answers of runs that ended while no replica followed them (a previous process of this
        one, or a replica that is gone: its runs marked interrupted) say how they ended."""
        await self._conclude_runs(None)

    async def _conclude_runs(self, run_ids: set[str] | None) -> None:
        """Edit the answers not yet concluded of runs that ended (of `run_ids` only, unless None)."""
        for row in await self.runs.store.unanswered():
            if row["run_id"] in self.runs.live or run_ids is not None and row["run_id"] not in run_ids:
                continue
            record = await self.runs.store.get(row["run_id"])
            if record is not None and record["status"] == "running":
                continue  # its replica follows it and concludes it; or, if that one is gone, whoever adopts it
            self._spawn(self._conclude(row["id"], row["run_id"], row["repo"], row["number"], row["link"],
                                       row["answer"]))

    async def _outcome(self, run_id: str, link: str) -> str:
        record = await self.runs.store.get(run_id) or {"status": "unknown"}
        run = f"[run `{run_id}`]({link})"
        if record.get("status") == "success" and record.get("pull_request_url"):
            return f"Done: {record['pull_request_url']} ({run})."
        if record.get("status") == "no_changes":
            return f"Finished with no changes to make ({run})."
        message = str((record.get("error") or {}).get("message") or "no reason was given")
        if len(message) > MESSAGE_CHARS:
            message = message[:MESSAGE_CHARS - 1] + "…"
        text = f"Stopped ({record.get('status')}): {message} ({run})."
        if record.get("pull_request_url"):
            text += f" Its changes are in {record['pull_request_url']}."
        elif record.get("kept"):
            text += " Its changes are kept with the run: publish or retry them from its page."
        return text

    async def _say(self, repo: str, number: int, body: str) -> int | None:
        """Comment on the issue or pull request; the comment's id, or None when GitHub refused it (logged)."""
        try:
            posted = await self._tool("comment_on_issue", {"repo": repo, "number": number, "body": body})
        except Refused as exc:
            log.warning("could not comment on %s#%d: %s", repo, number, exc)
            return None
        return posted.get("id")

    async def _tool(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """A github tool's answer; `Refused` with its message when it fails or does not answer in time."""
        args = {k: self.redact(v) if k == "body" else v for k, v in args.items()}
        timeout = min(self.settings.limits.tool_seconds, PUBLISH_CALL_SECONDS)
        try:
            result = await self.runs.services.pool.call("github", tool, args, timeout)
        except TimeoutError:
            raise Refused(f"github.{tool} did not answer within {timeout:g} s", 504) from None
        except Exception as exc:  # noqa: BLE001 - the server went away: say so, as for a failed call
            raise Refused(f"github.{tool} failed: {exc}", 502) from None
        if result.is_error:
            raise Refused(f"github.{tool} failed: {self.redact(result_text(result))}", 502)
        return result.structured_content or {}

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.answers.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.answers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an answer comment failed", exc_info=task.exception())

    async def close(self, _: web.Application) -> None:
        """Let answers finish for a while (their runs ended at shutdown), then stop the rest."""
        if self.answers:
            _, pending = await asyncio.wait(set(self.answers), timeout=ANSWERS_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
