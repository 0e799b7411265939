"""The MCP server class both servers are built on: it reports the project's version, and tells a caller whose
arguments fail a tool's input schema what to fix in the tool's own terms."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import CallToolResult, InputRequiredResult
from pydantic import ValidationError

# What an argument must be, by pydantic's error type, in JSON's words (pydantic's own text names Python types).
_EXPECTED = {
    "missing": "is required",
    "string_type": "must be a string", "string_unicode": "must be a string",
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be an object", "model_type": "must be an object", "model_attributes_type": "must be an object",
}


def package_version() -> str:
    """The installed version of this project, for `serverInfo.version`."""
    try:
        return importlib.metadata.version("tiny-backspace")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


class ToolServer(MCPServer):
    """An `MCPServer` that reports the project's version, and tells a caller whose arguments fail the input schema
    what to fix in the tool's own terms: the argument and what it must be, not pydantic's report (which names
    internal classes and links to pydantic's site)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        kwargs.setdefault("version", package_version())
        super().__init__(name, **kwargs)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None
                        ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            invalid = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(invalid, ValidationError):
                raise
            schema = next((t.input_schema for t in await self.list_tools() if t.name == name), {})
            # Still caused by the ValidationError: the SDK then logs the argument names, never their values.
            raise ToolError(invalid_arguments(name, invalid, schema)) from invalid


def invalid_arguments(tool: str, error: ValidationError, schema: dict[str, Any]) -> str:
    """What was wrong with the arguments of a call to `tool`, one argument a line, and what to do about it."""
    described = schema.get("properties", {})
    problems: list[str] = []
    for err in error.errors(include_url=False):
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
        problem = f"- {where or 'the arguments'} {_expected(err)}"
        description = described.get(where, {}).get("description") if err["type"] == "missing" else None
        problem += f" ({description.rstrip('.')})" if description else ""
        if problem not in problems:
            problems.append(problem)
    fix = "Correct it" if len(problems) == 1 else "Correct them"
    return f"Invalid arguments for {tool}:\n" + "\n".join(problems) + f"\n{fix} and call {tool} again."


def _expected(err: Any) -> str:
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _EXPECTED:
        return _EXPECTED[kind] + ("" if kind == "missing" else f" (got {_json_kind(given)})")
    if kind == "int_from_float":
        return "must be a whole number"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters long (it has {len(given)})"
    if kind == "string_too_short":
        least = ctx["min_length"]
        return "must not be empty" if least == 1 else f"must be at least {least} characters long"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "value_error":
        return f"is not valid: {ctx.get('error', '')}"
    # The rest of pydantic's messages ("Input should be greater than or equal to 1") name no Python type.
    said = re.fullmatch(r"(?:Input|String|List|Value|Dictionary) should (.*)", err["msg"])
    return f"must {said.group(1)}" if said and "instance" not in said.group(1) else "is not valid"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"
