"""The fake GitHub REST API's conversations: issue comments, pull request review comments and replies,
collaborator permissions (docs.github.com/rest/issues/comments, /pulls/comments, /collaborators)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .github_api import FakeGitHub


class Conversations:
    """What people wrote on the fake's issues and pull requests, and who may write to which repository."""

    def __init__(self, api: FakeGitHub) -> None:
        self.api = api

    def routes(self) -> list[web.RouteDef]:
        return []


__all__ = ["Conversations", "Any"]
