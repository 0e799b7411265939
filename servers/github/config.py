"""Configuration read once from GITHUB_* variables; its secrets never print (masking is common.redact's)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from common.settings import at_least, read, setting

from .forge import ForgeError, check_branch_name


def _url(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError("expected an http(s) URL such as https://api.github.com")
    return value.rstrip("/")


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


def _private_key(value: str) -> Secret:
    """A GitHub App's private key (RSA, what GitHub gives to download) as PEM text, or as the path of a PEM file."""
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            with open(value, encoding="ascii") as fh:
                value = fh.read()
        except (OSError, UnicodeDecodeError):
            raise ValueError("expected PEM text (-----BEGIN …) or the path of a readable PEM file") from None
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(value.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError("expected an unencrypted private key in PEM, as the GitHub App's settings page gives it") \
            from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("expected the GitHub App's RSA private key; GitHub signs App tokens with RS256")
    return Secret(value)


def _prefix(value: str) -> str:
    try:
        check_branch_name(value.rstrip("/") or "x")
    except ForgeError as exc:
        raise ValueError(str(exc)) from None
    return value


@dataclass(frozen=True)
class Settings:
    """Read once from GITHUB_* environment variables."""

    token: Secret | None = setting("GITHUB_TOKEN", None, parse=Secret, repr=False)
    api_url: str = setting("GITHUB_API_URL", "https://api.github.com", parse=_url)
    branch_prefix: str = setting("GITHUB_BRANCH_PREFIX", "tb/", parse=_prefix)
    app_id: str | None = setting("GITHUB_APP_ID", None)
    app_private_key: Secret | None = setting("GITHUB_APP_PRIVATE_KEY", None, parse=_private_key, repr=False)
    write_interval_s: float = setting("GITHUB_WRITE_INTERVAL_S", 1.0, check=at_least(0))
    # GitHub asks for a minute's wait after a secondary rate limit without retry-after.
    max_rate_limit_wait_s: float = setting("GITHUB_MAX_RATE_LIMIT_WAIT_S", 60.0, check=at_least(0))
    # Anything but an explicit yes keeps workflows out of reach.
    allow_workflow_changes: bool = setting("GITHUB_ALLOW_WORKFLOW_CHANGES", False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of GITHUB_* variables; a `ConfigError` names every bad one."""
        return read(cls, os.environ if env is None else env)

    def secrets(self) -> list[str]:
        """Every secret value these settings hold, for redaction."""
        return [s.reveal() for s in (self.token, self.app_private_key) if s is not None]

