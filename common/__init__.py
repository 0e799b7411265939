"""What the orchestrator and the MCP servers must agree on, defined once; both sides import it, and it imports
neither."""
