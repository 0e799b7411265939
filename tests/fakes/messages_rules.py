"""What the real Messages API refuses, as one `validate(body)` that answers with the API's own message."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]+")
MAX_CACHE_BREAKPOINTS = 4
CONTEXT_MANAGEMENT_BETA = "context-management-2025-06-27"


def _blocks(content: Any) -> list[Any]:
    # A string is shorthand for one text block, and the API checks it as one.
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _check_text(block: dict[str, Any], where: str) -> str | None:
    value = block.get("text")
    if not isinstance(value, str):
        return f"{where}.text: Input should be a valid string"
    section = where.split(".")[0]  # the real message names only the section, not the block
    if not value:
        return f"{section}: text content blocks must be non-empty"
    if not value.strip():
        return f"{section}: text content blocks must contain non-whitespace text"
    return None


def _check_block(block: Any, where: str) -> str | None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return f"{where}.type: Field required"
    if block["type"] == "text":
        return _check_text(block, where)
    if block["type"] == "tool_use":
        if not isinstance(block.get("id"), str) or not TOOL_USE_ID.fullmatch(block["id"]):
            return f"{where}.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        if not isinstance(block.get("input"), dict):
            return f"{where}.input: Input should be a valid dictionary"
    if block["type"] == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            return f"{where}.tool_use_id: Field required"
        for k, inner in enumerate(_blocks(block.get("content", []))):
            if problem := _check_block(inner, f"{where}.content.{k}"):
                return problem
    return None


def _check_tools(body: dict[str, Any]) -> str | None:
    tools, names = body.get("tools") or [], set()
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    for i, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            return f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        if name in names:
            return "tools: Tool names must be unique."
        names.add(name)
        schema = tool.get("input_schema")
        # Server and built-in tools (`"type": "bash_20250124"`, …) are described by their type, not a schema.
        if tool.get("type") in (None, "custom") and (not isinstance(schema, dict) or schema.get("type") != "object"):
            return f"tools.{i}.custom.input_schema.type: Input should be 'object'"
    uses_tools = any(isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result")
                     for m in body["messages"] for b in _blocks(m.get("content")))
    if uses_tools and not tools:
        return "Requests which include `tool_use` or `tool_result` blocks must define tools."
    return None


def _check_messages(body: dict[str, Any]) -> str | None:
    messages = body["messages"]
    merged: list[tuple[str, list[dict[str, Any]], int]] = []  # the API merges consecutive turns of one role
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, (str, list)):
            return f"messages.{i}.content: Input should be a valid string or list"
        prefill = i == len(messages) - 1 and message["role"] == "assistant"
        if content == [] and not prefill:
            return f"messages.{i}: all messages must have non-empty content except for the optional final " \
                   "assistant message"
        for j, block in enumerate(_blocks(content)):
            if problem := _check_block(block, f"messages.{i}.content.{j}"):
                return problem
        if prefill and content and (_blocks(content)[-1].get("text") or "x")[-1].isspace():
            return "messages: final assistant content cannot end with trailing whitespace"
        if merged and merged[-1][0] == message["role"]:
            merged[-1][1].extend(_blocks(content))
        else:
            merged.append((message["role"], list(_blocks(content)), i))
    if merged[0][0] != "user":
        return "messages: first message must use the \"user\" role"
    for k, (role, blocks, i) in enumerate(merged):
        results = [b for b in blocks if b["type"] == "tool_result"]
        if role == "assistant":
            answered = {b["tool_use_id"] for b in merged[k + 1][1] if b["type"] == "tool_result"} \
                if k + 1 < len(merged) else set()
            if missing := [b["id"] for b in blocks if b["type"] == "tool_use" and b["id"] not in answered]:
                return f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: " \
                       f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` " \
                       "block in the next message."
            if results:
                return f"messages.{i}: `tool_result` blocks can only be in `user` messages"
        elif results:
            asked = {b["id"] for b in merged[k - 1][1] if b["type"] == "tool_use"} if k else set()
            if unexpected := [b["tool_use_id"] for b in results if b["tool_use_id"] not in asked]:
                return f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: " \
                       f"{', '.join(unexpected)}. Each `tool_result` block must have a corresponding `tool_use` " \
                       "block in the previous message."
            if any(b["type"] != "tool_result" for b in blocks[:len(results)]):
                return f"messages.{i}: `tool_result` blocks must come first in the user message, before any " \
                       "other content"
    return None


def _check_system(body: dict[str, Any]) -> str | None:
    system = body.get("system")
    if system is None or isinstance(system, str):
        return None
    if not isinstance(system, list):
        return "system: Input should be a valid string or list"
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            return f"system.{i}.type: Input should be 'text'"
        if problem := _check_text(block, f"system.{i}"):
            return problem
    return None


def _check_cache_control(body: dict[str, Any]) -> str | None:
    system = body.get("system") if isinstance(body.get("system"), list) else []
    blocks = [*system, *(body.get("tools") or [])]
    for message in body["messages"]:
        for block in _blocks(message["content"]):
            blocks += [block, *(_blocks(block.get("content")) if block["type"] == "tool_result" else [])]
    found = sum(1 for block in blocks if isinstance(block, dict) and block.get("cache_control"))
    if found > MAX_CACHE_BREAKPOINTS:
        return f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {found}."
    return None


def _threshold(value: Any, where: str, *kinds: str) -> str | None:
    if not isinstance(value, dict) or value.get("type") not in kinds:
        return f"{where}.type: Input should be " + " or ".join(f"'{kind}'" for kind in kinds)
    if isinstance(value.get("value"), bool) or not isinstance(value.get("value"), int) or value["value"] < 0:
        return f"{where}.value: Input should be a valid integer greater than or equal to 0"
    return None


def _check_clear_tool_uses(edit: dict[str, Any], where: str) -> str | None:
    for name, kinds in (("trigger", ("input_tokens", "tool_uses")), ("keep", ("tool_uses",)),
                        ("clear_at_least", ("input_tokens",))):
        if edit.get(name) is not None and (problem := _threshold(edit[name], f"{where}.{name}", *kinds)):
            return problem
    excluded = edit.get("exclude_tools")
    if excluded is not None and not (isinstance(excluded, list) and all(isinstance(n, str) for n in excluded)):
        return f"{where}.exclude_tools: Input should be a valid list of strings"
    inputs = edit.get("clear_tool_inputs")
    if inputs is not None and not isinstance(inputs, bool) and \
            not (isinstance(inputs, list) and all(isinstance(n, str) for n in inputs)):
        return f"{where}.clear_tool_inputs: Input should be a valid boolean or list of strings"
    return None


def _check_context_management(body: dict[str, Any], betas: Collection[str]) -> str | None:
    config = body.get("context_management")
    if config is None:
        return None
    if CONTEXT_MANAGEMENT_BETA not in betas:  # unknown without the beta, as any field the API does not define
        return "context_management: Extra inputs are not permitted"
    edits = config.get("edits") if isinstance(config, dict) else None
    if not isinstance(edits, list):
        return "context_management.edits: Input should be a valid list"
    for i, edit in enumerate(edits):
        if not isinstance(edit, dict) or edit.get("type") != "clear_tool_uses_20250919":
            # The real API has other edits (clear_thinking_20251015, compact_20260112); the fake models none.
            return f"context_management.edits.{i}.type: the fake Messages API models only clear_tool_uses_20250919"
        if problem := _check_clear_tool_uses(edit, f"context_management.edits.{i}"):
            return problem
    return None


def validate(body: Any, *, betas: Collection[str] = (), count: bool = False) -> str | None:
    """The reason the real API would refuse this request body, or None when it would accept it. `betas` are the
    request's `anthropic-beta` names; `count` checks it as `POST /v1/messages/count_tokens` does (no max_tokens)."""
    if not isinstance(body, dict):
        return "There was an issue with your request body: expected a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not count and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        return "max_tokens: Input should be greater than or equal to 1"
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "messages: at least one message is required"
    for check in (_check_messages, _check_system, _check_tools, _check_cache_control):
        if problem := check(body):
            return problem
    return _check_context_management(body, betas)
