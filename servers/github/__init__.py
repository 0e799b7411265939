"""The github MCP server: branches, commits and pull requests on GitHub or on a local git repository."""
