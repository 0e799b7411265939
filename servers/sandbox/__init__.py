"""The sandbox MCP server: isolated repository copies where an agent reads, edits and runs code."""
