"""How the fake Messages API sees a request's size: one tokenizer, prompt caching, and clearing old tool uses.

`count_tokens(body)` is the fake's one deterministic tokenizer: about one token per 3.6 characters of each part the
model reads (system text, each tool's name, description and JSON schema, each block's text, a tool call's name and
JSON input, a tool result's content), plus a few tokens per block and per message, a few at the start of every
prompt and a few after its last block, where the assistant's turn opens. The usage numbers, the context window and
the `count_tokens` endpoint all use it, so they always agree.

`PromptCache` follows the prompt caching docs: the prompt is read as tools, then system, then messages, one block
after another; a block with `cache_control` is a breakpoint whose prefix (everything up to and including it) is
written to the cache when it holds at least the model's minimum (1024 tokens, 2048 for Haiku). A breakpoint finds
a hit at its own boundary or at one of the 20 block boundaries before it. An entry lives 5 minutes (`"ttl": "1h"`:
an hour) and every hit renews it. Usage then splits the prompt in three: `cache_read_input_tokens` (the longest
prefix hit), `cache_creation_input_tokens` (from there to the last breakpoint) and `input_tokens` (the rest).

`clear_tool_uses(body, edit)` is the `clear_tool_uses_20250919` context edit, applied before anything is counted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

START_TOKENS = 4  # the start of every prompt
TURN_TOKENS = 3  # the assistant's turn opening after the last block: never cached, as the real API reports
MESSAGE_TOKENS = 3  # a message's role
BLOCK_TOKENS = 2  # a block's framing
LOOKBACK = 20  # earlier block boundaries a breakpoint checks for a hit
TTL_S = {"5m": 300.0, "1h": 3600.0}
CLEARED = "[cleared to save context]"  # the fake's own wording: the docs name no text
CLEAR_TRIGGER = {"type": "input_tokens", "value": 100_000}
CLEAR_KEEP = {"type": "tool_uses", "value": 3}


def text_tokens(value: str) -> int:
    """Tokens for a piece of text: one per 3.6 characters, rounded up."""
    return -(-len(value) * 5 // 18)


def min_cacheable_tokens(model: str) -> int:
    """The shortest prefix the model caches."""
    return 2048 if "haiku" in model else 1024


def _blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _bare(part: Any) -> Any:
    """A tool or block without its `cache_control` markers, which are no part of the prompt's content."""
    if not isinstance(part, dict):
        return part
    bare = {k: v for k, v in part.items() if k != "cache_control"}
    if isinstance(bare.get("content"), list):
        bare["content"] = [_bare(inner) for inner in bare["content"]]
    return bare


def _ttl(part: Any) -> str | None:
    """The TTL of the cache breakpoint on a tool or block (one inside a tool result counts for it), or None."""
    if not isinstance(part, dict):
        return None
    for marked in [part, *(part.get("content") if isinstance(part.get("content"), list) else [])]:
        control = marked.get("cache_control") if isinstance(marked, dict) else None
        if isinstance(control, dict):
            return control.get("ttl") if control.get("ttl") in TTL_S else "5m"
    return None


def _block_tokens(block: Any) -> int:
    if not isinstance(block, dict):
        return BLOCK_TOKENS + text_tokens(json.dumps(block))
    kind = block.get("type")
    if kind == "text":
        return BLOCK_TOKENS + text_tokens(str(block.get("text", "")))
    if kind == "tool_use":
        return BLOCK_TOKENS + text_tokens(str(block.get("name", "")) + json.dumps(block.get("input", {})))
    if kind == "tool_result":
        return BLOCK_TOKENS + sum(_block_tokens(inner) for inner in _blocks(block.get("content", [])))
    if kind == "thinking":
        return BLOCK_TOKENS + text_tokens(str(block.get("thinking", "")))
    return BLOCK_TOKENS + text_tokens(json.dumps(_bare(block), sort_keys=True))


def _tool_tokens(tool: Any) -> int:
    if isinstance(tool, dict) and tool.get("type") in (None, "custom"):
        described = str(tool.get("name", "")) + str(tool.get("description", "")) + \
            json.dumps(tool.get("input_schema", {}), sort_keys=True)
        return BLOCK_TOKENS + text_tokens(described)
    return BLOCK_TOKENS + text_tokens(json.dumps(_bare(tool), sort_keys=True))


@dataclass(frozen=True)
class Unit:
    """One block of the prompt as the cache sees it: its content, its tokens, and its breakpoint's TTL if any."""

    key: str
    tokens: int
    ttl: str | None


def prompt_units(body: dict[str, Any]) -> list[Unit]:
    """The prompt's blocks in cache order: tools, system, messages (a message's role counts with its first block)."""
    units = [Unit(json.dumps(["tool", _bare(tool)], sort_keys=True), _tool_tokens(tool), _ttl(tool))
             for tool in body.get("tools") or []]
    system = body.get("system")
    units += [Unit(json.dumps(["system", _bare(block)], sort_keys=True), _block_tokens(block), _ttl(block))
              for block in (_blocks(system) if system else [])]
    for message in body.get("messages") or []:
        role = message.get("role") if isinstance(message, dict) else None
        blocks = _blocks(message.get("content")) if isinstance(message, dict) else []
        if not blocks:  # an empty final assistant message still opens a turn
            units.append(Unit(json.dumps([role]), MESSAGE_TOKENS, None))
        for j, block in enumerate(blocks):
            opens = role if j == 0 else None
            units.append(Unit(json.dumps([opens, _bare(block)], sort_keys=True),
                              (MESSAGE_TOKENS if j == 0 else 0) + _block_tokens(block), _ttl(block)))
    return units


def content_tokens(content: Iterable[Any]) -> int:
    """The tokens of a response's content blocks (its output tokens)."""
    return sum(_block_tokens(block) for block in content)


def count_tokens(body: dict[str, Any]) -> int:
    """The request's input tokens, as the fake counts them everywhere."""
    return START_TOKENS + sum(unit.tokens for unit in prompt_units(body)) + TURN_TOKENS


class PromptCache:
    """Prefixes written by earlier requests, by model and exact content (cache_control markers aside)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._expiry: dict[str, tuple[float, float]] = {}  # prefix hash -> (expires at, TTL)

    def usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Read and write the cache for this request; its input tokens split into uncached, read and written."""
        units, now = prompt_units(body), self.clock()
        hashes, prefixes = [], []
        digest, tokens = hashlib.sha256(str(body.get("model")).encode()).hexdigest(), START_TOKENS
        for unit in units:
            digest = hashlib.sha256((digest + unit.key).encode()).hexdigest()
            tokens += unit.tokens
            hashes.append(digest)
            prefixes.append(tokens)
        total = tokens + TURN_TOKENS
        breakpoints = [i for i, unit in enumerate(units) if unit.ttl]
        read, hit = 0, None
        for b in breakpoints:
            found = next((j for j in range(b, max(b - LOOKBACK, 0) - 1, -1)
                          if self._expiry.get(hashes[j], (0.0, 0.0))[0] > now), None)
            if found is not None and prefixes[found] > read:
                read, hit = prefixes[found], found
        if hit is not None:
            ttl = self._expiry[hashes[hit]][1]
            self._expiry[hashes[hit]] = (now + ttl, ttl)
        minimum = min_cacheable_tokens(str(body.get("model")))
        written = 0
        for b in breakpoints:
            if prefixes[b] >= minimum:
                ttl = max(TTL_S[units[b].ttl or "5m"], self._expiry.get(hashes[b], (0.0, 0.0))[1])
                self._expiry[hashes[b]] = (now + ttl, ttl)
                written = max(written, prefixes[b] - read)
        return {"input_tokens": total - read - written, "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written}


def clear_tool_uses(body: dict[str, Any], edit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The body after a `clear_tool_uses_20250919` edit, and what it cleared (None when it did not apply).

    Once the prompt holds more than `trigger` (input tokens, or tool uses), the results of the oldest tool uses are
    replaced by a placeholder, all but the `keep` most recent uses and those of `exclude_tools`; with
    `clear_tool_inputs` (true, or a list of tool names) the calls' inputs are emptied too. When that clears fewer
    than `clear_at_least` input tokens, nothing is cleared."""
    trigger, keep = edit.get("trigger") or CLEAR_TRIGGER, (edit.get("keep") or CLEAR_KEEP)["value"]
    excluded = set(edit.get("exclude_tools") or [])
    inputs = edit.get("clear_tool_inputs") or False
    uses = [block for message in body["messages"] if message["role"] == "assistant"
            for block in _blocks(message["content"]) if block.get("type") == "tool_use"]
    before = count_tokens(body)
    if (before if trigger["type"] == "input_tokens" else len(uses)) <= trigger["value"]:
        return body, None
    cleared = [use for use in uses[:max(len(uses) - keep, 0)] if use.get("name") not in excluded]
    if not cleared:
        return body, None
    ids = {use["id"]: use.get("name") for use in cleared}
    edited = copy.deepcopy(body)
    for message in edited["messages"]:
        if not isinstance(message["content"], list):
            continue
        for k, block in enumerate(message["content"]):
            if block.get("type") == "tool_result" and block.get("tool_use_id") in ids:
                marker = {"cache_control": block["cache_control"]} if block.get("cache_control") else {}
                ttl = _ttl(block)
                if ttl and not marker:  # the breakpoint was on the content now cleared: it stays on the result
                    marker = {"cache_control": {"type": "ephemeral", **({"ttl": ttl} if ttl == "1h" else {})}}
                message["content"][k] = {**_bare(block), "content": CLEARED, **marker}
            elif block.get("type") == "tool_use" and block.get("id") in ids and \
                    (inputs is True or (isinstance(inputs, list) and block.get("name") in inputs)):
                message["content"][k] = {**block, "input": {}}
    cleared_tokens = max(before - count_tokens(edited), 0)  # a result shorter than the placeholder clears nothing
    if cleared_tokens < ((edit.get("clear_at_least") or {}).get("value") or 0):
        return body, None
    return edited, {"type": "clear_tool_uses_20250919", "cleared_tool_uses": len(cleared),
                    "cleared_input_tokens": cleared_tokens}


def apply_context_edits(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The body as the model reads it after the request's `context_management` edits, and the edits applied."""
    applied = []
    for edit in (body.get("context_management") or {}).get("edits") or []:
        body, report = clear_tool_uses(body, edit)
        if report:
            applied.append(report)
    return body, applied
