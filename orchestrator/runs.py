"""Runs as background tasks that outlive their connections: start, follow (replay, then live), cancel.

Readers of a live run read its events from memory as they happen; the store gets them in batches a few
milliseconds later and serves finished runs. Any number of readers can follow one run, and a reader that reconnects
continues after the last event it saw. The model's turns are kept as they complete, as the run's trajectory.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from . import replay, run
from .events import Event, EventLog
from .mcp_pool import ServerUnavailable
from .run import PUBLISH_CALL_SECONDS, RunControl, RunFailed, RunRequest, Services, execute, new_run_id, \
    open_pull_request
from .store import RunStore

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.05  # events reach the store in batches at most this old; readers of a live run see them at once
STOP_SECONDS = 120  # a stopped run keeps its work (a draft pull request) in this long, or is cancelled outright


class NotPublishable(Exception):
    """A run's kept work cannot be published or retried now; the message says why; `status` is the HTTP one."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass
class LiveRun:
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    task: asyncio.Task | None = None
    client: str = ""  # who started it, for the per-client cap
    agents: list[str] = field(default_factory=list)  # the agents started so far, for the model's turns
    turns: int = 0
    control: RunControl = field(default_factory=RunControl)


class RunManager:
    def __init__(self, services: Services, store: RunStore):
        self.services = services
        self.store = store
        self.live: dict[str, LiveRun] = {}
        self._unstored: list[Event] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._publishing: set[str] = set()  # runs whose kept work is being published

    def start(self, request: RunRequest, client: str = "") -> str:
        """Start a run in the background; its events can be followed at once."""
        run_id = new_run_id()
        self.store.create(run_id, request.repo_url, request.described(), request.mode)
        live = self.live[run_id] = LiveRun(client=client)
        live.control.store = lambda work: self.store.keep_work(run_id, work)
        live.control.mark_published = lambda url: self.store.published(run_id, url)
        live.control.save_checkpoint = lambda work: self.store.checkpoint(run_id, work)
        live.task = asyncio.create_task(self._drive(run_id, request, live), name=run_id)
        return run_id

    async def _drive(self, run_id: str, request: RunRequest, live: LiveRun) -> None:
        events = EventLog(run_id)
        model = replay.Recorder(replay.for_run(self.services.model), lambda turn: self._keep_turn(run_id, live, turn))
        try:
            async for event in execute(request, replace(self.services, model=model), events, live.control):
                if event["type"] == "agent" and event.get("state") == "start":
                    live.agents.append(event["agent"])
                self._keep(live, event)
        except asyncio.CancelledError:
            # Cancelled outright (a stop that did not end in time): its sandbox is gone; say how it ended.
            self._keep(live, events("error", reason="cancelled", message="the run was cancelled"))
            self._keep(live, events("completion", status="cancelled"))
        finally:
            try:
                self.flush()
                self.store.checkpoint(run_id, None)  # the run kept or published its work itself
            finally:
                live.done = True
                live.changed.set()
                self.live.pop(run_id, None)

    def _keep(self, live: LiveRun, event: Event) -> None:
        live.events.append(event)
        live.changed.set()
        live.changed = asyncio.Event()
        self._unstored.append(event)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def _keep_turn(self, run_id: str, live: LiveRun, turn: dict[str, Any]) -> None:
        live.turns += 1
        try:
            self.store.add_turn(run_id, live.turns, live.agents[-1] if live.agents else "agent", len(live.agents),
                                turn)
        except sqlite3.Error as exc:
            log.error("could not store turn %d of %s: %s; its trajectory will lack it", live.turns, run_id, exc)

    def flush(self) -> None:
        """Store the events kept since the last flush, in one transaction."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        events, self._unstored = self._unstored, []
        if not events:
            return
        try:
            self.store.append(*events)
        except sqlite3.Error as exc:
            # Readers of live runs have these events already; keep them for the next flush rather than lose them.
            log.error("could not store %d run events (will retry): %s", len(events), exc)
            self._unstored[:0] = events
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(1.0, self.flush)

    def clients(self) -> list[str]:
        """Who started each run in flight, once per run."""
        return [r.client for r in self.live.values()]

    async def follow(self, run_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The run's events after `after`: stored ones first, then live ones until the run completes."""
        live = self.live.get(run_id)
        if live is None:
            for event in self.store.events(run_id, after):
                yield event
            return
        index = after  # live runs keep every event in memory, seq n at index n - 1
        while True:
            while index < len(live.events):
                index += 1
                yield live.events[index - 1]
            if live.done:
                return
            await live.changed.wait()

    async def cancel(self, run_id: str, keep: bool = True) -> bool:
        """Stop a live run's agents at once and wait for it to end, its changes kept as a draft (or discarded);
        False when it is not running."""
        live = self.live.get(run_id)
        if live is None or live.task is None or live.done:
            return False
        await self._stop([live], keep, STOP_SECONDS)
        return True

    @staticmethod
    async def _stop(runs: list[LiveRun], keep: bool, wait_s: float) -> None:
        for live in runs:
            live.control.cancel(keep)
        tasks = [live.task for live in runs if live.task]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=wait_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def get(self, run_id: str) -> dict[str, Any] | None:
        """A run's record; a live run's `usage` is what it has spent so far."""
        record = self.store.get(run_id)
        live = self.live.get(run_id)
        if record is not None and live is not None and live.control.budget is not None:
            record["usage"] = live.control.budget.report()
        return record

    def steer(self, run_id: str, text: str) -> str | None:
        """Hand `text` to the run's active agent at its next turn; why not, when it cannot be."""
        live = self.live.get(run_id)
        if live is None or live.done:
            return "the run is not running"
        return live.control.say(text)

    async def publish(self, run_id: str) -> dict[str, Any]:
        """Open a draft pull request from the work a stopped run kept; `NotPublishable` says why not."""
        if run_id in self._publishing:
            raise NotPublishable(f"run {run_id}'s changes are being published now; GET /runs/{run_id} shows the "
                                 "pull request when it is open")
        self._publishing.add(run_id)
        try:
            kept = self._kept(run_id)
            if kept["published_url"]:
                raise NotPublishable(f"run {run_id}'s changes are already published: {kept['published_url']}")
            timeout = min(self.services.settings.limits.tool_seconds, PUBLISH_CALL_SECONDS)
            try:
                pr = await open_pull_request(self.services.pool, kept, True, timeout)
            except RunFailed as exc:
                raise NotPublishable(f"the forge refused the changes: {exc}. They are still kept: retry the run "
                                     f"(POST /runs/{run_id}/retry) to change them", 409) from None
            except ServerUnavailable as exc:
                raise NotPublishable(f"the changes could not be published: {exc}. They are still kept; try again "
                                     "when the forge answers", 502) from None
            finally:  # a commit made before opening the pull request failed is not made again
                if kept.get("commit"):
                    self.store.keep_work(run_id, {k: v for k, v in kept.items() if k != "published_url"})
            self.store.published(run_id, pr["url"])
            return pr
        finally:
            self._publishing.discard(run_id)

    def retry(self, run_id: str, client: str = "") -> str:
        """Start a new run of the same request from the work a stopped run kept."""
        kept = self._kept(run_id)
        resume = {"run_id": run_id, "reason": kept["reason"] or "it did not finish", "changeset": kept["changeset"]}
        return self.start(RunRequest(kept["repo"], kept["prompt"], kept["mode"], kept["setup"], resume,
                                     issue=kept.get("issue"), pull_request=kept.get("pull_request")), client)

    def _kept(self, run_id: str) -> dict[str, Any]:
        if run_id in self.live:
            raise NotPublishable(f"run {run_id} is still running; cancel it first (its changes are kept as a draft)")
        kept = self.store.kept_work(run_id)
        if kept is None:
            raise NotPublishable(f"run {run_id} kept no changes: it published them, made none, or discarded them",
                                 404)
        return kept

    async def recover(self) -> list[str]:
        """Mark the runs a previous process left unfinished as interrupted. Their sandboxes went with the old
        servers; a sandbox server that finds a dead server's folder removes it."""
        interrupted = []
        for record in self.store.unfinished():
            run_id = record["id"]
            events = EventLog(run_id)
            events.seq = self.store.last_seq(run_id)
            reason = "the service restarted while this run was in flight"
            self.store.append(events("error", reason="interrupted", message=reason))
            kept = self._recovered(events, reason)
            self.store.append(events("completion", status="interrupted", **({"kept": True} if kept else {})))
            interrupted.append(run_id)
        return interrupted

    def _recovered(self, events: EventLog, reason: str) -> bool:
        """Keep the last checkpoint of a run the service lost, for publish and retry; whether there was one."""
        run_id = events.run_id
        saved = self.store.checkpoint_of(run_id)
        if saved is None:
            return False
        changeset, prompt = saved["changeset"], saved["prompt"]
        title = saved.get("title") or prompt  # what the pull request's title is made of
        body = (f"> **Draft:** {reason}; these are its changes as of the last turn that changed files.\n\n"
                + (f"## Issue\nFixes #{saved['issue']}\n\n" if saved.get("issue") else "")
                + (f"## Follow-up\nFollows up pull request #{saved['pull_request']}\n\n"
                   if saved.get("pull_request") else "")
                + ("## Request\n" + "\n".join(f"> {line}" for line in prompt.strip().splitlines()) + "\n\n"
                   if prompt.strip() else "")
                + f"_Opened by Tiny Backspace, run `{run_id}`._")
        self.store.keep_work(run_id, {"repo": saved["repo"], "prompt": prompt, "mode": saved["mode"],
                                      "setup": saved["setup"], "reason": reason, "changeset": changeset,
                                      "issue": saved.get("issue"), "pull_request": saved.get("pull_request"),
                                      "branch": f"{saved['prefix']}{run.branch_name(prompt or title, run_id)}",
                                      "title": run.title(title), "body": body})
        self.store.checkpoint(run_id, None)
        self.store.append(events("kept", reason=reason, files=[f["path"] for f in changeset["files"]],
                                 deleted=changeset["deleted"], publish_url=f"/runs/{run_id}/publish",
                                 retry_url=f"/runs/{run_id}/retry",
                                 message=f"{reason}; its changes as of its last turn that changed files are kept: "
                                         f"POST /runs/{run_id}/publish opens a draft pull request from them, "
                                         f"POST /runs/{run_id}/retry starts a new run from them"))
        return True

    async def shutdown(self, grace_s: float) -> None:
        """Let live runs finish for up to `grace_s` seconds, then stop the rest, their work kept."""
        tasks = [r.task for r in self.live.values() if r.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
            await self._stop([r for r in self.live.values() if not r.done], True, STOP_SECONDS)
