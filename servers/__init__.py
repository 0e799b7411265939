"""The MCP servers: sandbox and github. Each runs on its own with `python -m servers.<name>`."""
