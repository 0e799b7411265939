"""Configuration read once from GITHUB_* variables; its secrets never print (masking is common.redact's)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .forge import check_branch_name


class Secret:
    """A value that never prints: `repr`, `str` and f-strings show a mask."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one call that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    """Read once from GITHUB_* environment variables."""

    token: Secret | None = None
    api_url: str = "https://api.github.com"
    branch_prefix: str = "tb/"
    app_id: str | None = None
    app_private_key: Secret | None = None
    write_interval_s: float = 1.0
    max_rate_limit_wait_s: float = 0.0
    allow_workflow_changes: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        key = env.get("GITHUB_APP_PRIVATE_KEY") or None
        if key and not key.lstrip().startswith("-----BEGIN") and os.path.isfile(key):
            with open(key, encoding="ascii") as fh:
                key = fh.read()
        token = env.get("GITHUB_TOKEN", "")
        if token.startswith("${"):  # a client that does not expand variables passed mcp.json's placeholder through
            token = ""
        prefix = env.get("GITHUB_BRANCH_PREFIX", cls.branch_prefix)
        if prefix.startswith("${"):  # mcp.json's placeholder, from a client that does not expand variables
            prefix = cls.branch_prefix
        if prefix:
            check_branch_name(prefix.rstrip("/") or "x")
        return cls(
            token=Secret(token) if token else None,
            api_url=(env.get("GITHUB_API_URL") or cls.api_url).rstrip("/"),
            branch_prefix=prefix,
            app_id=env.get("GITHUB_APP_ID") or None,
            app_private_key=Secret(key) if key else None,
            write_interval_s=float(env.get("GITHUB_WRITE_INTERVAL_S", cls.write_interval_s)),
            max_rate_limit_wait_s=float(env.get("GITHUB_MAX_RATE_LIMIT_WAIT_S", cls.max_rate_limit_wait_s)),
            # Anything but an explicit yes, an unexpanded placeholder included, keeps workflows out of reach.
            allow_workflow_changes=env.get("GITHUB_ALLOW_WORKFLOW_CHANGES", "").strip().lower() in ("1", "true", "yes"),
        )

    def secrets(self) -> list[str]:
        """Every secret value these settings hold, for redaction."""
        return [s.reveal() for s in (self.token, self.app_private_key) if s is not None]

