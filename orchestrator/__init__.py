"""The orchestrator: an aiohttp service that runs the agent loop over the MCP servers."""
