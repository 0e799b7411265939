"""Record and replay: a run's trajectory exported, then replayed against the current code through the real service,
with the real sandbox and forge and no model API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from orchestrator import replay
from orchestrator.config import Settings
from orchestrator.run import Services
from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import API_KEY, FAST, of_type, post_code, serve, stack
from .test_run import BUGGY, fix_script
from .test_team import coder, planner

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOOK = re.compile(r"in \d+\.\d+s\b")
FIX = {"prompt": "Fix add(); its test fails.", "mode": "single"}


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


def by_hand(*agents: tuple[str, list]) -> dict:
    """A trajectory written from scripts of the fake Messages API, one per agent (by default the single agent's
    fix)."""
    agents = agents or (("agent", fix_script()),)
    return {"format": replay.FORMAT, "request": {"repo": "", **FIX},
            "agents": [{"agent": name, "turns": [{"content": list(t.content), "stop_reason": t.stop_reason}
                                                 for t in script]} for name, script in agents]}


async def replayed(pool, trajectory: dict, repo: Path, tmp_path: Path, mode: str = "single") -> list[dict]:
    """The events of a run of the service with TB_MODEL=replay:<the trajectory>, as a client reads them."""
    path = tmp_path / f"trajectory-{len(list(tmp_path.glob('trajectory-*')))}.json"
    path.write_text(json.dumps(trajectory))
    model = replay.load(f"replay:{path}")
    async with serve(Services(Settings(model=model.name, limits=FAST), pool, model)) as url:
        _, events, _ = await post_code(url, {"repoUrl": str(repo), **FIX, "mode": mode})
    return events


def calls(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["name"], json.dumps(e["input"])) for e in of_type(events, "tool_call") if e["state"] == "complete"]


def results(events: list[dict]) -> list[tuple[str, bool, str]]:
    """What each tool answered; commands' whole output, since the same commands ran on the same files (all but
    how long unittest took, which no replay repeats)."""
    return [(e["name"], e["is_error"], TOOK.sub("in …s", e["content"]) if e["name"] == "sandbox_exec" else "")
            for e in of_type(events, "tool_result")]


async def test_a_run_is_exported_as_its_trajectory_and_replayed_offline_to_the_same_pull_request(pool, make_repo,
                                                                                                 tmp_path):
    script = fix_script()
    async with stack(pool, script) as s:
        _, recorded_events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), **FIX})
        run_id = recorded_events[0]["run_id"]
        status, trajectory = await get_json(f"{s.url}/runs/{run_id}/trajectory")
        missing, _ = await get_json(f"{s.url}/runs/run_0000000000000000/trajectory")
    assert status == 200 and missing == 404
    assert trajectory["run_id"] == run_id and trajectory["request"]["prompt"] == FIX["prompt"]
    assert [a["agent"] for a in trajectory["agents"]] == ["agent"]
    assert [t["content"] for t in trajectory["agents"][0]["turns"]] == [list(t.content) for t in script]
    assert all(t["usage"]["input_tokens"] > 0 for t in trajectory["agents"][0]["turns"])

    # No Messages API now: the model's decisions come from the recording, the tools' results from the tools.
    repo = make_repo(BUGGY)
    events = await replayed(pool, trajectory, repo, tmp_path)
    assert events[-1]["status"] == "success" and of_type(events, "error") == []
    assert calls(events) == calls(recorded_events)
    assert results(events) == results(recorded_events)
    assert events[0]["model"] == "replay:" + str(tmp_path / "trajectory-0.json")
    assert of_type(events, "usage")[0]["cost_usd"] == 0
    assert git(repo, "show", "tb/fix-add:calc.py").endswith("return a + b")


async def test_the_trajectory_is_redacted_like_everything_the_service_publishes(pool, make_repo):
    script = [turn(text(f"The key in the environment is {API_KEY}."))]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": f"Use {API_KEY}",
                                               "mode": "single"})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.url}/runs/{events[0]['run_id']}/trajectory") as resp:
                raw = await resp.text()
    assert API_KEY not in raw and "[redacted]" in raw
    assert json.loads(raw)["agents"][0]["turns"][0]["content"][0]["text"] == "The key in the environment is [redacted]."


async def test_a_call_the_model_got_wrong_when_recorded_replays_as_it_was(pool, make_repo, tmp_path):
    script = [turn(tool_use("sandbox_read_file", {"file": "calc.py"})), *fix_script()]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), **FIX})
        _, trajectory = await get_json(f"{s.url}/runs/{events[0]['run_id']}/trajectory")
    first = trajectory["agents"][0]["turns"][0]
    assert first["unfit"] == [first["content"][0]["id"]]
    events = await replayed(pool, trajectory, make_repo(BUGGY), tmp_path)
    assert of_type(events, "tool_result")[0]["is_error"] and events[-1]["status"] == "success"


def truncated() -> dict:
    t = by_hand()
    del t["agents"][0]["turns"][3:]
    return t


def renamed_tool() -> dict:
    t = by_hand()
    t["agents"][0]["turns"][1]["content"][1]["name"] = "sandbox_patch_file"
    return t


def planner_goes_on() -> dict:
    return by_hand(("planner", planner() + [turn(text("One more look."))]), ("coder", coder()))


def planner_only() -> dict:
    return by_hand(("planner", planner()))


@pytest.mark.parametrize("recording, mode, said", [
    (truncated, "single", "the agent (agent 1) asks for turn 4, but the recording has 3"),
    (renamed_tool, "single", "turn 2 of the agent (agent 1) no longer fits the current code: sandbox_patch_file is "
                             "not among its tools"),
    (planner_goes_on, "team", "the planner (agent 1) finished after 2 of its 3 recorded turns"),
    (planner_only, "team", "the run starts agent 2, but the recording has only 1 (planner)"),
])
async def test_a_replay_that_parts_from_its_recording_ends_with_an_error_saying_where(pool, make_repo, tmp_path,
                                                                                     recording, mode, said):
    repo = make_repo(BUGGY)
    events = await replayed(pool, recording(), repo, tmp_path, mode)
    errors = of_type(events, "error")
    assert [e["reason"] for e in errors] == ["failed"] and said in errors[0]["message"], errors
    assert "record the trajectory again" in errors[0]["message"]
    assert events[-1]["type"] == "completion" and events[-1]["status"] == "error"
    # What the agents changed before the replay parted is kept as a draft, as by any run that cannot go on.
    drafts = of_type(events, "pull_request")
    assert all(pr["draft"] for pr in drafts) and (recording is not truncated or drafts)
    assert git(repo, "branch", "--list", "tb/*").split() == [pr["head"] for pr in drafts]


async def test_the_command_line_replays_a_trajectory_from_any_folder(make_repo, tmp_path):
    repo = make_repo(BUGGY)
    path = tmp_path / "fix.json"
    path.write_text(json.dumps(by_hand()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "ANTHROPIC_"))}
    env |= {"TB_DATA_DIR": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator", "run", "--replay", str(path),
                                                "--repo", str(repo), cwd=repo, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert f"(single, replay:{path})" in lines[0]
    assert any(line.startswith("pull request #1: file://") for line in lines)
    assert git(repo, "show", "tb/fix-add:calc.py").endswith("return a + b")


async def test_a_trajectory_that_cannot_be_used_is_one_line_at_start_up(make_repo, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"format": replay.FORMAT, "agents": [{"agent": "x"}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "ANTHROPIC_"))}
    results = []
    for trajectory in (tmp_path / "missing.json", tmp_path / "bad.json"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator", "run", "--in-process", "--repo", str(make_repo(BUGGY)), "Fix it.",
            env=env | {"TB_MODEL": f"replay:{trajectory}", "TB_DATA_DIR": str(tmp_path / "data")},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        results.append((proc.returncode, err.decode().strip().splitlines()))
    (missing_code, missing), (bad_code, bad) = results
    assert missing_code == 2 and missing == [f"error: no trajectory at {tmp_path / 'missing.json'}: export one "
                                             "with GET /runs/<id>/trajectory"]
    assert bad_code == 2 and len(bad) == 1 and "agents/0: 'turns' is a required property" in bad[0]
