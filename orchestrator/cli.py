"""`python -m orchestrator run --repo URL_OR_PATH "instruction"`: one run, rendered live in the terminal.

The run goes through a service (`--service`, default http://127.0.0.1:8002) or, with `--in-process`, through the
same app started inside this process on a loopback port, so both paths validate, redact and store alike. With
`--replay PATH` the run is in process and its model plays back a recorded trajectory (no key, no network).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp

RECONNECTS = 5
# What a hostile repository's or model's text must not send to a terminal: C0 and C1 controls (every escape sequence
# starts with one) and the bidirectional controls that reorder what a line appears to say.
UNSEEN = "\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f{UNSEEN}]")
JSON_UNSAFE = re.compile(f"[{UNSEEN}]")  # json.dumps escapes the C0 controls itself
CUT_COMMAND_RESULT = re.compile(r'\s*\{\s*"exit_code"\s*:\s*(-?\d+)')
COLOURS = {"+": "32", "-": "31", "@": "36", "ok": "32", "err": "31", "dim": "2", "bold": "1"}


class Refused(Exception):
    """The service answered with an error instead of a stream; the message says what to do."""


class CannotStart(Exception):
    """A setting or file an in-process run needs cannot be used; the message says what to do."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator run",
                                     description="Run one job and watch it: exit code 0 when a pull request opened.",
                                     epilog="python -m orchestrator run --recent [N]: list the N most recent runs, "
                                            "when each started and how long it took")
    parser.add_argument("instruction", nargs="?", help="what to change, in words (with --replay: the recorded one)")
    parser.add_argument("--repo", required=True, help="https://github.com/owner/name, owner/name, or a local path")
    parser.add_argument("--mode", choices=("team", "single"), help="default: team (with --replay: the recorded one)")
    parser.add_argument("--attempts", type=int, metavar="N",
                        help="coders working on the plan at once (1-4; team mode), each in a sandbox of its own; the "
                             "reviewer chooses one")
    parser.add_argument("--service", default=os.environ.get("TB_SERVICE_URL", "http://127.0.0.1:8002"),
                        help="the service to run through (TB_SERVICE_URL; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("TB_API_TOKEN"), help="bearer token (TB_API_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the raw events, one JSON object a line")
    parser.add_argument("--in-process", action="store_true",
                        help="start the MCP servers and the model here instead of using a service")
    parser.add_argument("--mcp-config", type=Path, help="with --in-process (default: ~/.config/tiny-backspace/"
                                                        "mcp.json if present, else the project's mcp.json)")
    parser.add_argument("--replay", type=Path, metavar="PATH",
                        help="run in process, the model replaying this trajectory (GET /runs/<id>/trajectory)")
    parser.add_argument("--setup", metavar="FILE|-",
                        help="a bash script (from FILE, or - for stdin) that installs the repository's dependencies "
                             "into /env before the agents start; an empty file means no setup. Default: the "
                             "repository's .tb/setup.sh, else what the sandbox detects (Python, Node, Go)")
    args = parser.parse_args(argv)
    if args.instruction is None and args.replay is None:
        parser.error("say what to change (the instruction), or pass --replay PATH to use a recorded one")
    return args


def recorded_request(path: Path) -> dict[str, Any]:
    """The request a trajectory recorded (prompt, mode), to replay it with."""
    from .replay import TrajectoryError, read

    try:
        return read(path).get("request") or {}
    except TrajectoryError as exc:
        raise CannotStart(str(exc)) from None


def setup_argument(source: str) -> str:
    """The text of the setup script `--setup` names: a file's, or standard input's for `-`."""
    try:
        return sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CannotStart(f"cannot read the setup script {source}: {exc}") from None


def repo_argument(repo: str) -> str:
    """A local path as the service wants it (absolute); anything else as given."""
    return str(Path(repo).resolve()) if not repo.startswith(("http://", "https://")) and Path(repo).exists() else repo


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The events of an SSE response, comments (pings) skipped."""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


async def follow(http: aiohttp.ClientSession, base: str, body: dict[str, Any], run_id: str | None = None
                 ) -> AsyncIterator[dict[str, Any]]:
    """Start the run (or follow `run_id`) and yield its events to `completion`, resuming with Last-Event-ID if the
    connection drops."""
    last, attempts = 0, 0
    while True:
        try:
            if run_id is None:
                request = http.post(f"{base}/code", json=body)
            else:
                request = http.get(f"{base}/runs/{run_id}/events", headers={"Last-Event-ID": str(last)})
            async with request as resp:
                if resp.content_type != "text/event-stream":
                    raise Refused(await error_message(resp))
                async for event in sse_events(resp):
                    run_id, last, attempts = event["run_id"], event["seq"], 0
                    yield event
                    if event["type"] == "completion":
                        return
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            if run_id is None:
                raise
        attempts += 1
        if attempts > RECONNECTS:
            raise Refused(f"lost the stream of {run_id} after {RECONNECTS} reconnects; "
                          f"follow it with GET {base}/runs/{run_id}/events")
        await asyncio.sleep(min(8, 0.5 * 2 ** attempts))  # back off: the service may be restarting


async def error_message(resp: aiohttp.ClientResponse) -> str:
    try:
        message = (await resp.json(content_type=None))["error"]
    except (ValueError, KeyError, TypeError):
        message = (await resp.text())[:300]
    if resp.status == 401:
        message += " (pass --token or set TB_API_TOKEN)"
    return f"{resp.status}: {message}"


class Terminal:
    """Renders events as lines; on a terminal, keeps a status line at the bottom, rewritten in place."""

    def __init__(self, out: TextIO, live: bool):
        self.out, self.live = out, live
        self.started = time.monotonic()
        self.state = "starting"
        self.agent = ""
        self.text = ""  # the model's text since the last line printed, shown whole when something else happens
        self.attempt: Any = None  # the attempt whose events are being shown; lines of an attempt start "[N] "
        self.text_attempt: Any = None  # the attempt `text` belongs to
        self.output: dict[str, str] = {}  # per call, the output's last line while it has no newline yet

    def paint(self, key: str, text: str) -> str:
        return f"\x1b[{COLOURS[key]}m{text}\x1b[0m" if self.live else text

    def line(self, text: str) -> None:
        tag = f"[{self.attempt}] " if self.attempt else ""
        self.out.write(("\r\x1b[2K" if self.live else "") + tag + text + "\n")

    def status(self) -> None:
        if self.live:
            tail = self.text.replace("\n", " ")[-60:]
            who = f" {self.agent}" if self.agent else ""
            self.out.write(f"\r\x1b[2K{self.paint('dim', f'[{time.monotonic() - self.started:5.1f}s{who}] ')}"
                           f"{self.state} {self.paint('dim', tail)}")
        self.out.flush()

    def flush_text(self) -> None:
        shown, self.attempt = self.attempt, self.text_attempt
        if self.text.strip():
            for text_line in self.text.strip().splitlines():
                self.line(f"  {text_line}")
        self.text, self.attempt = "", shown
        for partial in self.output.values():
            self.output_line(partial)
        self.output.clear()

    def output_line(self, text: str) -> None:
        self.line(self.paint("dim", f"     | {text}"))

    def show_output(self, e: dict[str, Any]) -> None:
        """A running tool's output: each whole line as it arrives, dimmed and indented under the call."""
        key = str(e.get("id") or e.get("tool"))
        *done, rest = (self.output.pop(key, "") + e.get("text", "")).split("\n")
        for output_line in done:
            self.output_line(output_line)
        if rest:
            self.output[key] = rest

    def show_environment(self, e: dict[str, Any]) -> None:
        if e.get("status") == "none":
            return self.line("- environment: nothing to set up")
        failed = e.get("status") == "failed"
        facts = [str(e.get("source"))] + (["cached"] if e.get("cached") else [])
        if e.get("duration_s") is not None:
            facts.append(f"{e['duration_s']} s")
        self.line(self.paint("err" if failed else "ok", f"- environment {e.get('status')}") + f" ({', '.join(facts)})")
        for item in e.get("installed") or []:
            self.line(f"    {item}")
        if e.get("test_commands"):
            self.line(f"    tests: {', '.join(e['test_commands'])}")
        for error_line in str(e.get("error") or "").splitlines():
            self.line(self.paint("err", f"    {error_line}"))

    def show(self, event: dict[str, Any]) -> None:
        """Render one event, with every string in it cleaned of what could drive the terminal."""
        e = scrubbed(event)
        kind = e["type"]
        if e.get("attempt") != self.text_attempt and kind != "output":
            self.flush_text()  # several attempts work at once: their text is never run together
        self.attempt = e.get("attempt")
        if kind == "text":
            self.text_attempt = self.attempt
            self.text += e["text"]
            self.state = "writing"
            return self.status()
        if kind == "tool_call" and e.get("state") == "streaming":
            self.state = f"calling {e['name']}"
            return self.status()
        if kind == "output":
            self.show_output(e)
            return self.status()
        self.flush_text()
        if kind == "run":
            self.line(f"{self.paint('bold', e['run_id'])} {e.get('repo', '')} ({e.get('mode')}, "
                      f"{e.get('model')})" + (f", following up #{e['pull_request']}" if e.get("pull_request") else ""))
        elif kind == "status":
            self.state = e.get("stage", "")
            self.line(f"- {e.get('message') or e.get('stage', '')}")
        elif kind == "sandbox":
            self.line(f"- sandbox {e.get('sandbox_id')} ({e.get('backend')}) at {str(e.get('base_commit'))[:10]}"
                      + (f": {e['note']}" if e.get("note") else ""))
        elif kind == "environment":
            self.show_environment(e)
        elif kind == "agent":
            self.agent = e["agent"] if e["state"] == "start" else ""
            self.line(self.paint("bold", f"== {e['agent']} {e['state']}")
                      + (f" ({e['turns']} turns)" if e.get("turns") else ""))
        elif kind == "tool_call":
            self.state = f"running {e['name']}"
            self.line(f"  -> {e['name']} {json.dumps(e.get('input', {}), ensure_ascii=False)[:300]}")
        elif kind == "tool_result":
            content = str(e.get("content", ""))
            outcome = "error" if e.get("is_error") else "failed" if command_failed(content) else "ok"
            self.line(f"{self.paint('ok' if outcome == 'ok' else 'err', f'  <- {outcome}')} {preview(content)}")
        elif kind == "planned_change":
            self.line(f"  plan: {e.get('file', '')}: {e.get('what', '')} ({e.get('why', '')})")
        elif kind == "diff":
            for diff_line in e.get("diff", "").splitlines():
                key = diff_line[:1] if diff_line[:1] in "+-@" and not diff_line.startswith(("+++", "---")) else ""
                self.line(self.paint(key, diff_line) if key else diff_line)
        elif kind == "pull_request":
            draft = " (draft)" if e.get("draft") else ""
            self.line(self.paint("ok", f"pull request #{e.get('number')}{draft}: {e.get('url', '')}"))
        elif kind == "usage":
            self.line(f"- usage: {e.get('input_tokens', 0)} in, {e.get('output_tokens', 0)} out, "
                      f"${e.get('cost_usd', 0):.4f}")
        elif kind == "error":
            self.line(self.paint("err", f"error ({e.get('reason')}): {e.get('message', '')}"))
        elif kind == "attempt_chosen":
            self.line(self.paint("ok", f"- the reviewer chose attempt {e.get('attempt')} ({e.get('verdict')}): "
                                       f"{e.get('reason', '')}"))
        elif kind == "kept":
            self.line(self.paint("err", f"kept: {e.get('message', '')}"))
        elif kind == "user_message":
            self.line(self.paint("bold", f"  you -> {e.get('agent')}: ") + str(e.get("text", "")))
        elif kind == "context":
            self.line(f"- {e.get('agent')}: context {e.get('action')} ({e.get('tokens_before')} -> "
                      f"{e.get('tokens_after')} tokens)")
        elif kind == "budget":
            self.line(self.paint("err", f"- budget: ${e.get('spent_usd', 0):.2f} of ${e.get('limit_usd', 0):.2f} "
                                        f"({e.get('scope')}) spent"))
        elif kind == "review_reply":
            where = e.get("path", "") + (f":{e['line']}" if e.get("line") is not None else "")
            self.line(self.paint("ok", f"- replied in thread {e.get('thread')} ({where})") + f": {e.get('reply', '')}")
        elif kind == "follow_up":
            commit = f"commit {str(e['commit'])[:10]}" if e.get("commit") else "no commit"
            self.line(f"- follow-up of #{e.get('pull_request')}: {commit}, {len(e.get('replied') or [])} "
                      "thread(s) answered")
            for left in e.get("not_addressed") or []:
                self.line(self.paint("err", f"    not addressed: thread {left.get('thread')} ({left.get('path')}): "
                                            f"{left.get('reason')}"))
        elif kind == "completion":
            self.state = e["status"]
            self.line(self.paint("ok" if e.get("pull_request_url") else "err",
                                 f"{e['status']} in {e.get('duration_s', 0)} s"))
            return
        self.status()


def command_result(content: str) -> dict[str, Any] | None:
    """A command's result (`exit_code`, output, `timed_out`) from a tool result's text; None for other tools."""
    try:
        result = json.loads(content)
    except ValueError:
        # The stream cuts a long result short, past where it could parse; its exit code comes first.
        cut = CUT_COMMAND_RESULT.match(content)
        return {"exit_code": int(cut[1]), "stdout": "(output cut short)"} if cut else None
    return result if isinstance(result, dict) and "exit_code" in result else None


def command_failed(content: str) -> bool:
    """Whether a tool result is a command that exited non-zero or timed out."""
    result = command_result(content)
    return result is not None and (result["exit_code"] != 0 or bool(result.get("timed_out")))


def preview(content: str) -> str:
    """One line for a tool's result: a command's exit code and last line, or the start of anything else."""
    if (command := command_result(content)) is not None:
        output = (str(command.get("stdout", "")) + str(command.get("stderr", ""))).strip().splitlines() or [""]
        timed_out = " (timed out)" if command.get("timed_out") else ""
        return f"exit {command['exit_code']}{timed_out}: {clean(output[-1])[:160]}"
    try:
        result = json.loads(content)
    except ValueError:
        result = None
    if isinstance(result, (dict, list)):
        content = json.dumps(result, ensure_ascii=False)
    lines = clean(content).strip().splitlines() or [""]
    return lines[0][:200] + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def clean(text: str) -> str:
    """`text` without anything that could drive a terminal (tabs become spaces; newlines stay)."""
    return CONTROL.sub("", text.replace("\t", "    "))


def scrubbed(value: Any) -> Any:
    """`value` with every string in it cleaned, however deep."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value


def json_line(event: dict[str, Any]) -> str:
    """One event as JSON, exact, with nothing a terminal would act on left raw."""
    return JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(event, ensure_ascii=False))


async def watch(base: str, token: str | None, body: dict[str, Any], as_json: bool, run_id: str | None = None
                ) -> int:
    """Start a run (or follow `run_id`), rendering it; 0 when a pull request opened, 1 when not, 130 when
    interrupted."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    view = Terminal(sys.stdout, sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    opened = False
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    # Idle streams carry a ping every TB_PING_S (15 s), so a read this long without one is a dead connection.
    timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        try:
            async for event in follow(http, base.rstrip("/"), body, run_id):
                run_id = event["run_id"]
                opened = opened or event["type"] == "pull_request"
                if as_json:
                    print(json_line(event), flush=True)
                else:
                    view.show(event)
        except asyncio.CancelledError:
            task.uncancel()
            if run_id:  # Ctrl-C stops the job, not only this view of it; its changes are kept as a draft
                async with http.post(f"{base.rstrip('/')}/runs/{run_id}/cancel", json={"changes": "keep"}) as resp:
                    await resp.read()
            print(f"\ncancelled {clean(run_id or 'the run')}; its changes are kept as a draft (discard them with "
                  f"--cancel {clean(run_id or 'RUN')} --discard)", file=sys.stderr)
            return 130
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    return 0 if opened else 1


async def in_process(args: argparse.Namespace, body: dict[str, Any]) -> int:
    """Start the service's app inside this process on a free loopback port, and watch the run through it."""
    from aiohttp import web

    from .service import STARTUP_ERRORS, build_services, settings_from_env
    from .app import build_app
    from .connections import listen
    from .runs import RunManager
    from .store import open_store

    try:
        settings = settings_from_env()
        if args.replay:
            settings = dataclasses.replace(settings, model=f"replay:{args.replay}")
        services = build_services(settings, args.mcp_config)
        store = await open_store(settings)
    except STARTUP_ERRORS as exc:
        raise CannotStart(str(exc)) from None
    runs = RunManager(services, store)
    runner = web.AppRunner(build_app(runs), handler_cancellation=True)
    listener = None
    try:
        await services.pool.start()
        await runs.begin()  # a replica of its own: a service sharing the store keeps its runs
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        listener = await listen(runner, sock=sock)
        return await watch(f"http://127.0.0.1:{sock.getsockname()[1]}", settings.api_token, body, args.json)
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        await services.pool.close()
        await store.close()


def recent_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator run --recent",
                                     description="List the most recent runs: how each ended, when it started, how "
                                                 "long it took, and why it failed.")
    parser.add_argument("--recent", type=int, nargs="?", const=20, metavar="N", help="how many (default 20)")
    parser.add_argument("--service", default=os.environ.get("TB_SERVICE_URL", "http://127.0.0.1:8002"),
                        help="the service (TB_SERVICE_URL; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("TB_API_TOKEN"), help="bearer token (TB_API_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print each run's record as one JSON object a line")
    return parser.parse_args(argv)


ACTIONS = ("--cancel", "--publish", "--retry", "--say")


def action_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator run",
                                     description="Act on a run: stop it, publish or retry the changes it kept, or "
                                                 "tell its active agent something.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--cancel", metavar="RUN", help="stop a run; its changes become a draft pull request")
    group.add_argument("--publish", metavar="RUN", help="open a draft pull request from the changes a run kept")
    group.add_argument("--retry", metavar="RUN", help="start a new run from the changes a run kept, and follow it")
    group.add_argument("--say", nargs=2, metavar=("RUN", "TEXT"), help="a message to a running run's active agent")
    parser.add_argument("--discard", action="store_true", help="with --cancel: drop the changes instead")
    parser.add_argument("--service", default=os.environ.get("TB_SERVICE_URL", "http://127.0.0.1:8002"),
                        help="the service (TB_SERVICE_URL; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("TB_API_TOKEN"), help="bearer token (TB_API_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the answer (and a retry's events) as JSON")
    return parser.parse_args(argv)


async def act(args: argparse.Namespace) -> int:
    """Do what `action_args` asked and print the answer; a retry is followed like a new run."""
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base = args.service.rstrip("/")
    if args.cancel:
        path, body = f"/runs/{args.cancel}/cancel", {"changes": "discard" if args.discard else "keep"}
    elif args.publish:
        path, body = f"/runs/{args.publish}/publish", None
    elif args.retry:
        path, body = f"/runs/{args.retry}/retry", None
    else:
        path, body = f"/runs/{args.say[0]}/messages", {"text": args.say[1]}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as http:
        async with http.post(base + path, json=body) as resp:
            if resp.status >= 400:
                raise Refused(await error_message(resp))
            answer = await resp.json()
    if args.json:
        print(json_line(answer))
    elif args.publish or args.cancel:
        url = answer.get("pull_request_url")
        print(clean(f"{answer.get('status', 'published')}: {url}" if url else f"{answer.get('status')}"))
    elif args.say:
        print(clean(answer.get("message", "sent")))
    if args.retry:
        return await watch(base, args.token, {}, args.json, answer["id"])
    return 0


def recent_lines(run: dict[str, Any]) -> list[str]:
    """A run of the list: id, status, when it started, how long it took, repository and prompt; then why it failed."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["created"]))
    took = f"took {run['duration_s']:.1f} s" if run.get("duration_s") is not None else "-"
    prompt = " ".join(str(run.get("prompt", "")).split())
    lines = [f"{run['id']}  {run['status']:<11} {started}  {took:<12} {str(run.get('repo', '')).rstrip('/')}  "
             f"{prompt[:60] + ('…' if len(prompt) > 60 else '')}"]
    if error := run.get("error"):
        lines.append(f"    {error.get('reason')}: {' '.join(str(error.get('message', '')).split())[:300]}")
    return [clean(line) for line in lines]


async def list_recent(args: argparse.Namespace) -> int:
    """Print the most recent runs of a service."""
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(f"{args.service.rstrip('/')}/runs", params={"limit": str(args.recent)}) as resp:
            if resp.status != 200:
                raise Refused(await error_message(resp))
            runs = (await resp.json())["runs"]
    for run in runs:
        print(json_line(run) if args.json else "\n".join(recent_lines(run)))
    return 0


def main(argv: list[str]) -> int:
    """Run one job; the exit code says whether a pull request opened."""
    recent = any(arg == "--recent" or arg.startswith("--recent=") for arg in argv)
    if any(arg in ACTIONS for arg in argv) or recent:
        args = recent_args(argv) if recent else action_args(argv)
        try:
            return asyncio.run(list_recent(args) if recent else act(args))
        except Refused as exc:
            print(f"error: {clean(str(exc))}", file=sys.stderr)
            return 2
        except aiohttp.ClientConnectionError as exc:
            print(f"error: no service answers at {args.service} ({clean(str(exc))}): start one with `./tb serve`",
                  file=sys.stderr)
            return 2
    args = parse_args(argv)
    try:
        request = recorded_request(args.replay) if args.replay else {}
        body = {"repoUrl": repo_argument(args.repo), "prompt": args.instruction or request.get("prompt", ""),
                "mode": args.mode or request.get("mode", "team")}
        if args.setup is not None:
            body["setup"] = setup_argument(args.setup)
        if args.attempts is not None:
            body["attempts"] = args.attempts
        if args.in_process or args.replay:
            return asyncio.run(in_process(args, body))
        return asyncio.run(watch(args.service, args.token, body, args.json))
    except (Refused, CannotStart) as exc:
        print("error: " + " ".join(clean(str(exc)).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while starting, before a run was there to cancel
        return 130
    except aiohttp.ClientConnectionError as exc:
        print(f"error: no service answers at {args.service} ({clean(str(exc))}): start one with `./tb serve`, "
              "or pass --in-process", file=sys.stderr)
        return 2


PULL_COMMANDS = ("pulls", "pull", "comment", "follow-up", "close")


def pull_number(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 2**31 - 1):
        raise argparse.ArgumentTypeError(f"{value!r} is no pull request number (./tb pulls REPO lists them)")
    return int(value)


def pull_args(argv: list[str]) -> argparse.Namespace:
    service = argparse.ArgumentParser(add_help=False)
    service.add_argument("--service", default=os.environ.get("TB_SERVICE_URL", "http://127.0.0.1:8002"),
                         help="the service (TB_SERVICE_URL; default %(default)s)")
    service.add_argument("--token", default=os.environ.get("TB_API_TOKEN"), help="bearer token (TB_API_TOKEN)")
    service.add_argument("--json", action="store_true", help="print the service's answer (a follow-up's events) as "
                                                             "JSON")
    parser = argparse.ArgumentParser(prog="./tb", description="A local repository's pull requests, through the "
                                                              "service: list, read, comment on, follow up, close.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("pulls", parents=[service], help="list the pull requests of a local repository")
    listing.add_argument("--state", choices=("open", "closed", "all"), default="open", help="default: open")
    shown = commands.add_parser("pull", parents=[service], help="show a pull request: description, diff, comments")
    comment = commands.add_parser("comment", parents=[service], help="comment on a pull request (with --path and "
                                                                     "--line: on a line of a file)")
    follow_up = commands.add_parser("follow-up", parents=[service], help="start a run that works on a pull "
                                    "request's review comments and commits to its branch; follow it like a run")
    close = commands.add_parser("close", parents=[service], help="close a pull request: delete its tb/ branch")
    for command in (listing, shown, comment, follow_up, close):
        command.add_argument("repo", metavar="REPO", help="the path of a local git repository")
    for command in (shown, comment, follow_up, close):
        command.add_argument("number", metavar="N", type=pull_number, help="the pull request's number")
    comment.add_argument("text", metavar="TEXT", help="what the comment says")
    comment.add_argument("--path", help="the file the comment is on, relative to the repository root")
    comment.add_argument("--line", type=pull_number, help="with --path: the line of the file")
    follow_up.add_argument("prompt", metavar="PROMPT", nargs="?", help="what else to change (optional)")
    follow_up.add_argument("--mode", choices=("team", "single"), help="default: team")
    args = parser.parse_args(argv)
    if getattr(args, "line", None) is not None and args.path is None:
        parser.error("--line needs --path: the file the line is in")
    return args


async def pull_request_call(args: argparse.Namespace, repo: str) -> dict[str, Any]:
    """The service's answer to the pull request command `args` names."""
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base, params = args.service.rstrip("/"), {"repo": repo}
    if args.command == "pulls":
        method, path, body = "GET", "/pulls", None
        params["state"] = args.state
    elif args.command == "pull":
        method, path, body = "GET", f"/pulls/{args.number}", None
    elif args.command == "comment":
        method, path = "POST", f"/pulls/{args.number}/comments"
        body = {"body": args.text} | ({"path": args.path} if args.path else {}) | (
            {"line": args.line} if args.line else {})
    else:
        method, path, body = "POST", f"/pulls/{args.number}/close", None
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=300)) as http:
        async with http.request(method, base + path, params=params, json=body) as resp:
            if resp.status >= 400:
                raise Refused(await error_message(resp))
            return await resp.json()


def pull_lines(answer: dict[str, Any], paint: Any) -> list[str]:
    """A pull request as a reader wants it: what it is, its description, its diff, then what people said."""
    lines = [paint("bold", f"#{answer['number']} {answer['title']}") + f" ({answer['state']}"
             + (", draft" if answer.get("draft") else "") + ")",
             f"{answer['head']} -> {answer['base']} at {str(answer.get('head_sha', ''))[:10]}, opened "
             f"{answer['created_at']}", ""]
    lines += (answer.get("body") or "(no description)").splitlines() + [""]
    for diff_line in (answer.get("diff") or "(no changes)").splitlines():
        key = diff_line[:1] if diff_line[:1] in "+-@" and not diff_line.startswith(("+++", "---")) else ""
        lines.append(paint(key, diff_line) if key else diff_line)
    lines += ["", paint("bold", f"Comments ({len(answer.get('comments') or [])})")]
    for comment in answer.get("comments") or []:
        lines += comment_lines(comment, "  ")
    threads = answer.get("review_threads") or []
    lines += ["", paint("bold", f"Review threads ({len(threads)})")]
    for thread in threads:
        where = thread["path"] + (f":{thread['line']}" if thread.get("line") is not None else "")
        lines.append(f"  {where}" + (paint("ok", " (addressed)") if thread.get("addressed") else ""))
        for comment in [thread, *(thread.get("replies") or [])]:
            lines += comment_lines(comment, "    ")
    return lines


def comment_lines(comment: dict[str, Any], indent: str) -> list[str]:
    who = (comment.get("author") or "someone") + (" (Tiny Backspace)" if comment.get("ours") else "")
    return [f"{indent}[{comment['id']}] {who}, {comment['created_at']}:",
            *(f"{indent}  {line}".rstrip() for line in str(comment.get("body", "")).splitlines())]


def answer_lines(args: argparse.Namespace, repo: str, answer: dict[str, Any], paint: Any) -> list[str]:
    """What the service answered, as lines for the terminal."""
    if args.command == "pulls":
        pulls = answer.get("pull_requests") or []
        if not pulls:
            return [f"no {'' if args.state == 'all' else args.state + ' '}pull requests in {repo}"]
        return [f"#{p['number']:<4} {p['state']:<7} {p['head']} -> {p['base']}  {p['title']}" for p in pulls]
    if args.command == "pull":
        return pull_lines(answer, paint)
    if args.command == "comment":
        where = f" on {args.path}" + (f":{args.line}" if args.line else "") if args.path else ""
        return [f"commented on #{args.number}{where} (comment {answer.get('id')})"]
    gone = "deleted its branch" if answer.get("deleted") else "its branch was already gone:"
    return [f"#{answer['number']} is {answer.get('state')}: {gone} {answer.get('head')}"]


def pulls_main(argv: list[str]) -> int:
    """`./tb pulls|pull|comment|follow-up|close ...`: a local repository's pull requests, through the service."""
    args = pull_args(argv)
    repo = repo_argument(args.repo)
    try:
        if args.command == "follow-up":
            body = {"repoUrl": repo, "pull_request": args.number} | ({"prompt": args.prompt} if args.prompt else {})
            return asyncio.run(watch(args.service, args.token, body | ({"mode": args.mode} if args.mode else {}),
                                     args.json))
        answer = asyncio.run(pull_request_call(args, repo))
    except Refused as exc:
        print("error: " + " ".join(clean(str(exc)).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except aiohttp.ClientConnectionError as exc:
        print(f"error: no service answers at {args.service} ({clean(str(exc))}): start one with `./tb serve`",
              file=sys.stderr)
        return 2
    if args.json:
        print(json_line(answer))
        return 0
    view = Terminal(sys.stdout, sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    # Cleaned before it is painted: what people wrote drives no terminal, the colours still do.
    print("\n".join(answer_lines(args, clean(repo), scrubbed(answer), view.paint)))
    return 0
