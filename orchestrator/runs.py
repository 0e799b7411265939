"""Runs as background tasks that outlive their connections: start, follow (replay, then live), cancel; and the
replicas that share one run store.

Readers of a run live here read its events from memory as they happen; the store gets them in batches a few
milliseconds later and serves finished runs and the runs of other replicas, whose new events its notifications
announce. Any number of readers can follow one run, and a reader that reconnects continues after the last event it
saw. The model's turns are kept as they complete, as the run's trajectory.

Each replica holds a lease in the store, renewed every third of TB_LEASE_S. The runs of a replica whose lease ran
out (or, on the same machine, whose process is gone) are adopted by another one: marked interrupted, their last
changes kept, their sandboxes removed. A cancel or a message for a run of another replica goes to it through the
store. Admission (the rate limit and the caps on runs in flight) is one transaction in the store, so its limits
hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import replay, run
from .events import Event, EventLog
from .mcp_pool import ServerUnavailable
from .run import PUBLISH_CALL_SECONDS, RunControl, RunFailed, RunRequest, Services, execute, new_run_id, \
    open_pull_request
from .store import Quota, RunStore

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.05  # events reach the store in batches at most this old; readers of a live run see them at once
STOP_SECONDS = 120  # a stopped run keeps its work (a draft pull request) in this long, or is cancelled outright
ANSWER_SECONDS = 10  # a replica asked to hand a message to its run answers within this
STORE_RETRY_SECONDS = 1.0  # events the store could not take are tried again this much later
PUBLISH_MARGIN_S = 60  # a claim to publish a run's kept work outlives its two calls by this much
STORE_ATTEMPTS = 3  # a run's kept work is written this many times over a blip of the store (1 s, then 2 s apart)


class NotAdmitted(Exception):
    """A run cannot start now: `reason` is "rate", "client", "total" (the limits) or "draining" (this replica is
    stopping); `wait_s`, when to try again."""

    def __init__(self, reason: str, wait_s: float):
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s


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
    agents: list[str] = field(default_factory=list)  # the agents started so far, for the model's turns
    turns: int = 0
    control: RunControl = field(default_factory=RunControl)
    lost: bool = False  # adopted by another replica (this one's lease ran out): stopped here, nothing more stored


class RunManager:
    def __init__(self, services: Services, store: RunStore):
        self.services = services
        self.store = store
        settings = services.settings
        self.quota = Quota(settings.max_runs, settings.max_runs_per_client, settings.rate_burst,
                           settings.rate_per_minute)
        self.lease_s = settings.lease_s
        self.live: dict[str, LiveRun] = {}
        self.draining = False  # stopping: no new runs
        self.recovered: list[Callable[[list[str]], None]] = []  # told the runs each recovery marked interrupted
        self._unstored: list[Event] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()  # stores, stops and clean-ups under way
        self._loops: list[asyncio.Task] = []  # the lease, and the requests of other replicas

    async def begin(self) -> list[str]:
        """Join the replicas: take a lease, adopt the runs of replicas that are gone (marked interrupted; their
        ids), then keep the lease and obey other replicas' requests in the background."""
        await self.store.beat(self.lease_s)
        interrupted = await self.recover()
        self._loops = [asyncio.create_task(self._keep_lease()), asyncio.create_task(self._obey())]
        return interrupted

    async def start(self, request: RunRequest, client: str = "") -> str:
        """Start a run in the background, once the store admitted it; its events can be followed at once.
        `NotAdmitted` says why not."""
        if self.draining:
            raise NotAdmitted("draining", 1.0)
        run_id = new_run_id()
        live = self.live[run_id] = LiveRun()  # before its record exists: a recovery never takes it for a lost one
        try:
            refused = await self.store.admit(run_id, request.repo_url, request.described(), request.mode, client,
                                             self.quota)
        except BaseException:
            self.live.pop(run_id, None)
            raise
        if refused is not None:
            self.live.pop(run_id, None)
            raise NotAdmitted(refused.reason, refused.wait_s)
        self._wire(run_id, live)
        live.task = asyncio.create_task(self._drive(run_id, request, live), name=run_id)
        return run_id

    def _wire(self, run_id: str, live: LiveRun) -> None:
        """Where a run keeps its work and checkpoints: the store, each write retried over a blip of it; nowhere once
        another replica took the run over. A checkpoint that cannot be kept is only a backup lost: the run goes on."""

        async def unless_lost(write: Any, *args: Any) -> None:
            for attempt in range(STORE_ATTEMPTS):
                if live.lost:
                    return
                try:
                    await write(run_id, *args)
                    return
                except Exception as exc:  # noqa: BLE001 - whatever the store's failure
                    if attempt == STORE_ATTEMPTS - 1:
                        raise
                    log.warning("could not store the work of %s (will try again): %s", run_id, exc)
                    await asyncio.sleep(STORE_RETRY_SECONDS * 2 ** attempt)

        async def checkpoint(work: dict[str, Any]) -> None:
            try:
                await unless_lost(self.store.checkpoint, work)
            except Exception as exc:  # noqa: BLE001
                log.error("could not store a checkpoint of %s: %s", run_id, exc)

        live.control.store = lambda work: unless_lost(self.store.keep_work, work)
        live.control.mark_published = lambda url: unless_lost(self.store.published, url)
        live.control.save_checkpoint = checkpoint

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
                await asyncio.shield(self._settle(run_id, live))
            finally:
                live.done = True
                live.changed.set()
                self.live.pop(run_id, None)

    async def _settle(self, run_id: str, live: LiveRun) -> None:
        """Store a run's last events; drop its checkpoint (the run kept or published its work itself), unless this
        replica gave the run up: then whoever marks it interrupted keeps that checkpoint as its work."""
        await self.flush()
        if live.lost:
            return
        try:
            await self.store.checkpoint(run_id, None)
        except Exception as exc:  # noqa: BLE001 - the store is unreachable: the row stays, unread
            log.error("could not drop the checkpoint of %s: %s", run_id, exc)

    def _keep(self, live: LiveRun, event: Event) -> None:
        live.events.append(event)
        live.changed.set()
        live.changed = asyncio.Event()
        if live.lost:
            return
        self._unstored.append(event)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_handle = None
        self._spawn(self.flush())

    def _keep_turn(self, run_id: str, live: LiveRun, turn: dict[str, Any]) -> None:
        live.turns += 1
        agent, seq = live.agents[-1] if live.agents else "agent", len(live.agents)
        self._spawn(self._store_turn(run_id, live.turns, agent, seq, turn))

    async def _store_turn(self, run_id: str, number: int, agent: str, agent_seq: int, turn: dict[str, Any]) -> None:
        try:
            await self.store.add_turn(run_id, number, agent, agent_seq, turn)
        except Exception as exc:  # noqa: BLE001 - the run goes on; only its trajectory lacks the turn
            log.error("could not store turn %d of %s: %s; its trajectory will lack it", number, run_id, exc)

    async def flush(self) -> None:
        """Store the events kept since the last flush, in one transaction, in order."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        async with self._flush_lock:  # batches reach the store in the order they were kept
            events = [e for e in self._unstored if not getattr(self.live.get(e["run_id"]), "lost", False)]
            self._unstored = []
            if not events:
                return
            try:
                await self.store.append(*events)
            except Exception as exc:  # noqa: BLE001 - whatever the store's failure, these events must not be lost
                # Readers of live runs have these events already; keep them for the next flush rather than lose them.
                log.error("could not store %d run events (will retry): %s", len(events), exc)
                self._unstored[:0] = events
                if self._flush_handle is None:
                    self._flush_handle = asyncio.get_running_loop().call_later(STORE_RETRY_SECONDS,
                                                                               self._flush_later)

    async def follow(self, run_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The run's events after `after`: stored ones first, then new ones until the run completes."""
        live = self.live.get(run_id)
        if live is None:
            async for event in self._follow_stored(run_id, after):
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

    async def _follow_stored(self, run_id: str, after: int) -> AsyncIterator[Event]:
        """A run that is not live here, from the store: one that ended, or runs on another replica (whose new
        events the store's notifications announce; it is read again every `poll_s` anyway)."""
        seq = after
        with self.store.watch(f"run:{run_id}") as changed:
            while True:
                changed.clear()
                ended = False
                if not (fresh := await self.store.events(run_id, seq)):
                    record = await self.store.get(run_id)
                    if ended := record is None or record["status"] != "running":
                        fresh = await self.store.events(run_id, seq)  # stored with its end, or before it
                for event in fresh:
                    seq = event["seq"]
                    yield event
                    if event["type"] == "completion":
                        return
                if ended:
                    if record is not None and seq == after and await self.store.last_seq(run_id) <= after:
                        # Nothing stored after what the reader saw: it saw the end already, or events a replica that
                        # died never stored, numbered as the end now is. It gets the end (again), rather than none.
                        ending = [e for e in await self.store.events(run_id) if e["type"] in ("error", "completion")]
                        for event in ending[-2:]:
                            yield event
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.store.poll_s)

    async def cancel(self, run_id: str, keep: bool = True) -> bool:
        """Stop a run's agents at once and wait for it to end, its changes kept as a draft (or discarded); False
        when it is not running. A run of another replica is stopped by that replica, asked through the store."""
        live = self.live.get(run_id)
        if live is not None and live.task is not None and not live.done:
            await self._stop([live], keep, STOP_SECONDS)
            return True
        record = await self.store.get(run_id)
        if record is None or record["status"] != "running":
            return False
        last = await self.store.last_seq(run_id)
        await self.store.send(run_id, "cancel", {"keep": keep})
        # Until it ended: stopped by its replica, or marked interrupted by another once that replica's lease ran out.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_SECONDS + self.lease_s):
                async for _ in self._follow_stored(run_id, last):
                    pass
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

    async def get(self, run_id: str) -> dict[str, Any] | None:
        """A run's record; a run live here has its `usage` as spent so far."""
        record = await self.store.get(run_id)
        live = self.live.get(run_id)
        if record is not None and live is not None and live.control.budget is not None:
            record["usage"] = live.control.budget.report()
        return record

    async def steer(self, run_id: str, text: str) -> str | None:
        """Hand `text` to the run's active agent at its next turn; why not, when it cannot be. A run of another
        replica gets it from that replica, asked through the store."""
        live = self.live.get(run_id)
        if live is not None and not live.done:
            return live.control.say(text)
        record = await self.store.get(run_id)
        if record is None or record["status"] != "running":
            return "the run is not running"
        command = await self.store.send(run_id, "say", {"text": text})
        with self.store.watch(f"reply:{command}") as changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_SECONDS):
                    while True:
                        changed.clear()
                        if (answer := await self.store.reply_of(command)) is not None:
                            return answer.get("refused")
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(changed.wait(), self.store.poll_s)
        return (f"the replica running it did not answer within {ANSWER_SECONDS} s; if it is gone, the run is marked "
                f"interrupted within {self.lease_s:g} s (TB_LEASE_S)")

    async def publish(self, run_id: str) -> dict[str, Any]:
        """Open a draft pull request from the work a stopped run kept; `NotPublishable` says why not. The store
        holds the claim, so that two replicas asked at once publish it once."""
        kept = await self._kept(run_id)
        if kept["published_url"]:
            raise NotPublishable(f"run {run_id}'s changes are already published: {kept['published_url']}")
        timeout = min(self.services.settings.limits.tool_seconds, PUBLISH_CALL_SECONDS)
        if not await self.store.claim_publishing(run_id, 2 * timeout + PUBLISH_MARGIN_S):
            raise NotPublishable(f"run {run_id}'s changes are being published now; GET /runs/{run_id} shows the "
                                 "pull request when it is open")
        try:
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
                    await self.store.keep_work(run_id, {k: v for k, v in kept.items() if k != "published_url"})
            await self.store.published(run_id, pr["url"])
            return pr
        finally:
            await asyncio.shield(self.store.release_publishing(run_id))

    async def retry(self, run_id: str, client: str = "") -> str:
        """Start a new run of the same request from the work a stopped run kept."""
        kept = await self._kept(run_id)
        resume = {"run_id": run_id, "reason": kept["reason"] or "it did not finish", "changeset": kept["changeset"]}
        return await self.start(RunRequest(kept["repo"], kept["prompt"], kept["mode"], kept["setup"], resume,
                                           issue=kept.get("issue"), pull_request=kept.get("pull_request")), client)

    async def _kept(self, run_id: str) -> dict[str, Any]:
        record = await self.store.get(run_id)
        if run_id in self.live or (record is not None and record["status"] == "running"):
            raise NotPublishable(f"run {run_id} is still running; cancel it first (its changes are kept as a draft)")
        kept = await self.store.kept_work(run_id)
        if kept is None:
            raise NotPublishable(f"run {run_id} kept no changes: it published them, made none, or discarded them",
                                 404)
        return kept

    async def recover(self) -> list[str]:
        """Mark the runs of replicas that are gone (a previous process of this one, or another that died) as
        interrupted, keep their last changes and remove their sandboxes; their ids. A run adopted earlier whose
        marking failed (the store, or the last flush of its replica, in the way) is marked again."""
        adopted = await self.store.adopt()
        async with self._flush_lock:  # no batch on its way: a run whose last events wait to be stored is not lost
            waiting = {e["run_id"] for e in self._unstored} | set(self.live) | {a["id"] for a in adopted}
            unmarked = [r for r in await self.store.running()
                        if r["replica"] == self.store.replica and r["id"] not in waiting]
        interrupted = []
        for record in adopted + unmarked:
            run_id = record["id"]
            try:
                await self._interrupt(run_id, "the service stopped while this run was in flight")
            except Exception as exc:  # noqa: BLE001 - it stays this replica's: marked at the next beat
                log.error("could not mark run %s interrupted (will try again): %s", run_id, exc)
                continue
            interrupted.append(run_id)
            self._spawn(self._remove_sandboxes(run_id))
        if interrupted:
            log.warning("marked %d run(s) of a replica that is gone as interrupted: %s", len(interrupted),
                        ", ".join(interrupted))
            for hook in self.recovered:
                hook(interrupted)
        return interrupted

    async def _interrupt(self, run_id: str, reason: str) -> None:
        """End a run the service lost: its last checkpoint kept for publish and retry, then its last events in one
        transaction, numbered after what is stored; the checkpoint dropped last, so a failure on the way is
        repeated whole."""
        events = EventLog(run_id)
        events.seq = await self.store.last_seq(run_id)
        saved = await self.store.checkpoint_of(run_id)
        ending = [events("error", reason="interrupted", message=reason)]
        if saved is not None:
            changeset = await self._keep_checkpoint(run_id, saved, reason)
            ending.append(events("kept", reason=reason, files=[f["path"] for f in changeset["files"]],
                                 deleted=changeset["deleted"], publish_url=f"/runs/{run_id}/publish",
                                 retry_url=f"/runs/{run_id}/retry",
                                 message=f"{reason}; its changes as of its last turn that changed files are kept: "
                                         f"POST /runs/{run_id}/publish opens a draft pull request from them, "
                                         f"POST /runs/{run_id}/retry starts a new run from them"))
        ending.append(events("completion", status="interrupted", **({"kept": True} if saved is not None else {})))
        await self.store.append(*ending)
        if saved is not None:
            await self.store.checkpoint(run_id, None)

    async def _remove_sandboxes(self, run_id: str) -> None:
        """Destroy the sandboxes a run of a replica that is gone left (what the sandbox server can still reach): its
        own (a `sandbox` event), and those of its attempts (`status` of stage `attempts`)."""
        try:
            found: dict[str, None] = {}
            for event in await self.store.events(run_id):
                if event["type"] == "sandbox" and event.get("sandbox_id"):
                    found[event["sandbox_id"]] = None
                elif event["type"] == "status" and event.get("stage") == "attempts":
                    found.update(dict.fromkeys(event.get("sandbox_ids") or []))
            await asyncio.gather(*(run.destroy_sandbox(self.services.pool, sandbox) for sandbox in found))
        except Exception as exc:  # noqa: BLE001 - the server's idle reaper (or Modal's TTL) is the backstop
            log.warning("could not remove the sandboxes of run %s: %s", run_id, exc)

    async def _keep_checkpoint(self, run_id: str, saved: dict[str, Any], reason: str) -> dict[str, Any]:
        """Keep the last checkpoint of a run the service lost as its work, for publish and retry; its changeset."""
        changeset, prompt = saved["changeset"], saved["prompt"]
        title = saved.get("title") or prompt  # what the pull request's title is made of
        body = (f"> **Draft:** {reason}; these are its changes as of the last turn that changed files.\n\n"
                + (f"## Issue\nFixes #{saved['issue']}\n\n" if saved.get("issue") else "")
                + (f"## Follow-up\nFollows up pull request #{saved['pull_request']}\n\n"
                   if saved.get("pull_request") else "")
                + ("## Request\n" + "\n".join(f"> {line}" for line in prompt.strip().splitlines()) + "\n\n"
                   if prompt.strip() else "")
                + f"_Opened by Tiny Backspace, run `{run_id}`._")
        await self.store.keep_work(run_id, {"repo": saved["repo"], "prompt": prompt, "mode": saved["mode"],
                                            "setup": saved["setup"], "reason": reason, "changeset": changeset,
                                            "issue": saved.get("issue"), "pull_request": saved.get("pull_request"),
                                            "branch": f"{saved['prefix']}{run.branch_name(prompt or title, run_id)}",
                                            "title": run.title(title), "body": body})
        return changeset

    async def _keep_lease(self) -> None:
        """Renew this replica's lease, and adopt the runs of replicas that are gone, every third of the lease. A
        replica that could not renew it for two thirds of it stops its runs: another may take them over soon."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.store.beat(self.lease_s)
                renewed = time.monotonic()
                await self._give_up_lost()
                await self.recover()
            except Exception as exc:  # noqa: BLE001 - the store is unreachable now: try again at the next beat
                log.error("could not renew this replica's lease: %s", exc)
                if time.monotonic() - renewed > self.lease_s * 2 / 3:
                    self._give_up(list(self.live), "this replica could not renew its lease in the run store")

    async def _give_up_lost(self) -> None:
        """Stop the runs another replica adopted while this one's lease had run out (a pause longer than the lease):
        that replica marked them interrupted and kept their changes; nothing of them is stored from here any more."""
        for run_id in list(self.live):
            record = await self.store.get(run_id)
            if record is not None and record["replica"] != self.store.replica:
                self._give_up([run_id], f"replica {record['replica']} took it over while this replica's lease had "
                                        "run out")

    def _give_up(self, run_ids: list[str], why: str) -> None:
        """Stop runs here without storing anything more of them: whoever adopts them ends them and keeps their
        last changes."""
        for run_id in run_ids:
            live = self.live.get(run_id)
            if live is not None and not live.lost:
                log.error("stopping run %s: %s", run_id, why)
                live.lost = True
                live.control.cancel(keep=False)

    async def _obey(self) -> None:
        """Carry out what other replicas ask of this one's runs: a stop, a message for the active agent."""
        with self.store.watch(f"commands:{self.store.replica}") as changed:
            while True:
                changed.clear()
                try:
                    commands = await self.store.received()
                except Exception as exc:  # noqa: BLE001 - the store is unreachable now: read again at the next poll
                    log.error("could not read the requests of other replicas: %s", exc)
                    commands = []
                for command in commands:
                    try:
                        await self._carry_out(command)
                    except Exception as exc:  # noqa: BLE001 - its sender's wait is bounded
                        log.error("could not answer request %s of another replica: %s", command["id"], exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.store.poll_s)

    async def _carry_out(self, command: dict[str, Any]) -> None:
        run_id, data = command["run_id"], command["data"]
        live = self.live.get(run_id)
        if command["kind"] == "cancel":  # its sender follows the run until it ends
            if live is not None and not live.done:
                self._spawn(self.cancel(run_id, keep=bool(data.get("keep", True))))
        elif command["kind"] == "say":
            refused = live.control.say(str(data.get("text", ""))) if live and not live.done else "the run ended"
            await self.store.reply(command["id"], {"refused": refused})

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self, grace_s: float) -> None:
        """Drain: start no new run, let live ones finish for up to `grace_s` seconds, then stop the rest, their work
        kept; then leave the replicas."""
        self.draining = True
        tasks = [r.task for r in self.live.values() if r.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
            await self._stop([r for r in self.live.values() if not r.done], True, STOP_SECONDS)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._background:
            await asyncio.wait(set(self._background), timeout=STOP_SECONDS)
        await self.flush()
        try:
            await self.store.leave()
        except Exception as exc:  # noqa: BLE001 - its lease runs out instead
            log.warning("could not leave the replicas: %s; this replica's lease runs out instead", exc)
