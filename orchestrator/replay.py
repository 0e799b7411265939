"""Record and replay: what the model decided in a run, kept as a trajectory, and a `Model` that plays one back.

A trajectory holds a run's request (repository, prompt, mode) and, for each agent in order, each of the model's
turns as it produced them: text and tool_use blocks, and the stop reason. `Recorder` hands each turn to the run's
store as it completes; `GET /runs/{id}/trajectory` exports them. `ReplayModel` (TB_MODEL=replay:PATH) answers every
turn from a trajectory, offline and deterministic. Tool results are not replayed: the tools really run, so a replay
is the current code against recorded decisions. Where a replay parts from its recording (more turns than were
recorded, an agent that stops sooner, a tool call that no longer fits), the run ends with an `error` event saying
where.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema

from .model import Model, ModelEvent, TextDelta, ToolInputDelta, TurnDone, Usage
from .run import RunFailed

PREFIX = "replay:"
FORMAT = "tiny-backspace-trajectory/1"
BLOCK = {"oneOf": [
    {"type": "object", "required": ["type", "text"],
     "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
    {"type": "object", "required": ["type", "id", "name", "input"],
     "properties": {"type": {"const": "tool_use"}, "id": {"type": "string"}, "name": {"type": "string"},
                    "input": {"type": "object"}}},
]}
SCHEMA = {
    "type": "object", "required": ["format", "agents"],
    "properties": {
        "format": {"const": FORMAT},
        "request": {"type": "object", "properties": {"repo": {"type": "string"}, "prompt": {"type": "string"},
                                                     "mode": {"enum": ["team", "single"]}}},
        "agents": {"type": "array", "items": {
            "type": "object", "required": ["agent", "turns"],
            "properties": {"agent": {"type": "string"}, "turns": {"type": "array", "items": {
                "type": "object", "required": ["content"],
                "properties": {"content": {"type": "array", "items": BLOCK},
                               "stop_reason": {"type": ["string", "null"]},
                               "unfit": {"type": "array", "items": {"type": "string"}}}}}}}},
    },
}


class TrajectoryError(Exception):
    """A trajectory file cannot be used; the message says what to fix."""


class ReplayFailed(RunFailed):
    """The run parted from its recording; the message says where and what to do."""


def is_replay(model_name: str) -> bool:
    """Whether a model name (TB_MODEL) asks for a replay."""
    return model_name.startswith(PREFIX)


def read(path: Path) -> dict[str, Any]:
    """A trajectory file, checked; `TrajectoryError` says what is wrong with it."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise TrajectoryError(f"no trajectory at {path}: export one with GET /runs/<id>/trajectory") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrajectoryError(f"cannot read the trajectory {path}: {exc}") from None
    problem = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data))
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "the top level"
        raise TrajectoryError(f"{path} is not a trajectory ({FORMAT}): {where}: {problem.message}; export one with "
                              "GET /runs/<id>/trajectory")
    return data


def load(model_name: str) -> ReplayModel:
    """The model TB_MODEL=replay:PATH names."""
    path = Path(model_name.removeprefix(PREFIX)).expanduser().absolute()
    return ReplayModel(read(path), f"{PREFIX}{path}")


def trajectory(record: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's trajectory from its stored record and turns (see `RunStore.turns`)."""
    agents = [{"agent": group[0]["agent"], "turns": [_exported(t) for t in group]}
              for group in (list(g) for _, g in itertools.groupby(turns, key=lambda t: t["agent_seq"]))]
    return {"format": FORMAT, "run_id": record["id"], "status": record["status"],
            "request": {"repo": record["repo"], "prompt": record["prompt"], "mode": record["mode"]},
            "agents": agents}


def _exported(turn: dict[str, Any]) -> dict[str, Any]:
    return {k: turn[k] for k in ("content", "stop_reason", "usage", "unfit") if k in turn}


def misfit(call: dict[str, Any], specs: dict[str, dict[str, Any]]) -> str | None:
    """Why a tool_use block does not fit the tools an agent has, or None when it does."""
    spec = specs.get(call["name"])
    if spec is None:
        return f"{call['name']} is not among its tools ({', '.join(specs) or 'none'})"
    problem = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(spec.get("input_schema") or {}).iter_errors(call["input"]))
    if problem is None:
        return None
    where = "/".join(str(p) for p in problem.absolute_path) or "its input"
    return f"{call['name']} no longer takes this input ({where}: {problem.message})"


class Recorder:
    """A run's model that hands each completed turn to `keep`: content, stop reason, usage, and the ids of calls
    that did not fit the tools even then (a replay lets those through, since the model erred, not the code)."""

    OPTIONS = ("name", "context_edit")  # set on a copy of this wrapper, they reach the model

    def __init__(self, model: Model, keep: Callable[[dict[str, Any]], None]):
        self.model = model
        self.keep = keep
        for option in self.OPTIONS:
            setattr(self, option, getattr(model, option, None))

    async def turn(self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                   ) -> AsyncIterator[ModelEvent]:
        """The wrapped model's turn, unchanged."""
        model = self.model
        # A role's own model (TB_<ROLE>_MODEL) and the API's context editing are set on a copy of this wrapper, and
        # reach the wrapped model here.
        changed = {option: getattr(self, option) for option in self.OPTIONS
                   if hasattr(model, option) and getattr(model, option) != getattr(self, option)}
        if changed:
            model = copy.copy(model)
            for option, value in changed.items():
                setattr(model, option, value)
        async for event in model.turn(system, messages, tools):
            if isinstance(event, TurnDone):
                specs = {t["name"]: t for t in tools}
                turn = {"content": event.content, "stop_reason": event.stop_reason, "usage": event.usage.as_dict()}
                if unfit := [b["id"] for b in event.content if b["type"] == "tool_use" and misfit(b, specs)]:
                    turn["unfit"] = unfit
                self.keep(turn)
            yield event


class _Cursor:
    """Where a replay is: the recorded agent in play and how many of its turns were used."""

    def __init__(self) -> None:
        self.agent = -1
        self.used = 0


class ReplayModel:
    """Answers each turn with the next recorded one of the same agent, with no network; raises `ReplayFailed`
    where the run parts from the recording."""

    def __init__(self, recorded: dict[str, Any], name: str):
        self.recorded = recorded
        self.name = name
        self.cursor = _Cursor()  # shared by the copies a run makes for its roles' model names

    def restart(self) -> ReplayModel:
        """The same recording from its first turn, for a new run."""
        return ReplayModel(self.recorded, self.name)

    async def turn(self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                   ) -> AsyncIterator[ModelEvent]:
        """The next recorded turn, streamed as the model streamed it, at no cost."""
        turn, where = self._next(len(messages) == 1)
        specs = {t["name"]: t for t in tools}
        for call in (b for b in turn["content"] if b["type"] == "tool_use"):
            if call["id"] not in turn.get("unfit", ()) and (problem := misfit(call, specs)):
                raise ReplayFailed(f"replay: {where} no longer fits the current code: {problem}; record the "
                                   "trajectory again from a run of the current code")
        content = copy.deepcopy(turn["content"])
        for index, block in enumerate(content):
            if block["type"] == "text":
                yield TextDelta(block["text"])
            else:
                yield ToolInputDelta(index, block["id"], block["name"], json.dumps(block["input"]))
        yield TurnDone(content, turn.get("stop_reason") or "end_turn", Usage())

    def _next(self, starts_agent: bool) -> tuple[dict[str, Any], str]:
        agents, cursor = self.recorded["agents"], self.cursor
        if starts_agent:  # an agent's first call carries its brief alone: the next recorded agent begins
            if cursor.agent >= 0 and cursor.used < len(agents[cursor.agent]["turns"]):
                done = agents[cursor.agent]
                raise ReplayFailed(f"replay: the {done['agent']} (agent {cursor.agent + 1}) finished after "
                                   f"{cursor.used} of its {len(done['turns'])} recorded turns, so the current code "
                                   "parts from the recording here; record the trajectory again")
            cursor.agent, cursor.used = cursor.agent + 1, 0
            if cursor.agent >= len(agents):
                raise ReplayFailed(f"replay: the run starts agent {cursor.agent + 1}, but the recording has only "
                                   f"{len(agents)} ({', '.join(a['agent'] for a in agents)}); record the "
                                   "trajectory again")
        agent = agents[cursor.agent]
        if cursor.used >= len(agent["turns"]):
            raise ReplayFailed(f"replay: the {agent['agent']} (agent {cursor.agent + 1}) asks for turn "
                               f"{cursor.used + 1}, but the recording has {len(agent['turns'])}; the current code "
                               "needs more of the model than was recorded: record the trajectory again")
        cursor.used += 1
        return agent["turns"][cursor.used - 1], f"turn {cursor.used} of the {agent['agent']} (agent {cursor.agent + 1})"


def for_run(model: Model) -> Model:
    """The model a new run starts with: a replay plays its recording from the start in every run."""
    return model.restart() if isinstance(model, ReplayModel) else model
