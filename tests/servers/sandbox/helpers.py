"""Calling sandbox tools the way any MCP client does, with results a test can read."""

from __future__ import annotations

from typing import Any

from mcp import Client


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """The structured result of a tool call that must succeed; for a text tool (no structured result), its text."""
    result = await client.call_tool(tool, arguments)
    text = result.content[0].text if result.content else ""
    assert not result.is_error, f"{tool} failed: {text}"
    return text if result.structured_content is None else result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    """The message of a tool call that must fail as an `isError` result."""
    result = await client.call_tool(tool, arguments)
    text = result.content[0].text if result.content else ""
    assert result.is_error, f"{tool} should have failed but returned {result.structured_content or text!r}"
    return text


async def sandbox(client: Client, repo, **kwargs: Any) -> str:
    """A new sandbox of `repo`; its id."""
    info = await call(client, "create_sandbox", repo_url=str(repo), **kwargs)
    return info["sandbox_id"]


async def sh(client: Client, sandbox_id: str, command: str, **kwargs: Any) -> dict:
    return await call(client, "exec", sandbox_id=sandbox_id, command=command, **kwargs)
