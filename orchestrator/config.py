"""Settings read once from TB_* environment variables (through common.settings, as the servers read theirs); every
bad value fails at start-up, named, with what it must be."""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import anthropic.types

from common.settings import ConfigError, at_least, between, one_of, read, setting


def newest_sonnet() -> str:
    """The newest Sonnet alias the installed anthropic SDK knows."""
    names: list[str] = []

    def collect(tp: object) -> None:
        for arg in typing.get_args(tp):
            if isinstance(arg, str):
                names.append(arg)
            else:
                collect(arg)

    collect(anthropic.types.Model)

    def version(name: str) -> tuple[int, ...]:
        return tuple(int(p) for p in name.removeprefix("claude-sonnet-").split("-") if len(p) < 8 and p.isdigit())

    aliases = [n for n in names if re.fullmatch(r"claude-sonnet-\d+(-\d)?", n)]
    return max(aliases, key=version) if aliases else "claude-sonnet-4-5"


def _roots(value: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in value.split(":") if p)


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip().lower() for n in value.split(",") if n.strip())


def _origins(value: str) -> tuple[str, ...]:
    return tuple(o.rstrip("/") for o in _names(value))


def _handle(value: str) -> str:
    handle = value.strip().removeprefix("@")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})", handle):
        raise ValueError("expected a GitHub login: letters, digits and hyphens, at most 39, e.g. tiny-backspace")
    return handle


def _database_url(value: str) -> str:
    if not re.fullmatch(r"postgres(ql)?://\S+", value):
        raise ValueError("expected a PostgreSQL URL, postgresql://user:password@host:5432/database")
    return value


def _public_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
        raise ValueError("expected the page's base URL, e.g. https://tb.example.com")
    return value.rstrip("/")


@dataclass(frozen=True)
class RunLimits:
    """The bounds of one run: each stop names the limit that caused it."""

    max_turns: int = setting("TB_MAX_TURNS", 60, check=at_least(1))
    # Input (cache reads too) + output over the whole run; the money budget (TB_MAX_COST_USD) is the tighter bound.
    max_tokens: int = setting("TB_MAX_TOKENS", 20_000_000, check=at_least(1))
    run_seconds: float = setting("TB_RUN_TIMEOUT_S", 1800.0, check=at_least(1))
    tool_seconds: float = setting("TB_TOOL_TIMEOUT_S", 660.0, check=at_least(1))  # exec may take 600 s by itself
    max_output_tokens: int = setting("TB_MAX_OUTPUT_TOKENS", 16_000, check=at_least(1))  # per model call
    overloaded_retries: int = setting("TB_OVERLOADED_RETRIES", 3, check=at_least(0))
    overloaded_backoff_s: float = setting("TB_OVERLOADED_BACKOFF_S", 2.0, check=at_least(0))
    # Each request to the model is kept under this many input tokens: old tool results are cleared, then older turns
    # summarised (see context.py). It must leave the reply room in the model's context window.
    context_tokens: int = setting("TB_CONTEXT_TOKENS", 100_000, check=at_least(1000))
    context_window: int = setting("TB_CONTEXT_WINDOW", 200_000, check=at_least(2000))
    # "api": the Messages API clears old tool results itself (its context management beta); the client's clearing
    # stays as the backstop at the window's edge. "client": the orchestrator alone clears.
    context_editing: str = setting("TB_CONTEXT_EDITING", "client", check=one_of("client", "api"))
    # USD at list prices (model.PRICES) for the whole run, checked before each model call; 80 % of it is warned of.
    # A team run on Sonnet mostly costs cents to a few dollars; $10 stops a run that loops, well before it gets dear.
    max_cost_usd: float = setting("TB_MAX_COST_USD", 10.0, check=at_least(0.01))
    # The same for each role over the run, all its agents together (the single agent is the role "agent"); unset:
    # only the run's limit applies.
    planner_max_cost_usd: float | None = setting("TB_PLANNER_MAX_COST_USD", None, check=at_least(0.01))
    coder_max_cost_usd: float | None = setting("TB_CODER_MAX_COST_USD", None, check=at_least(0.01))
    reviewer_max_cost_usd: float | None = setting("TB_REVIEWER_MAX_COST_USD", None, check=at_least(0.01))
    agent_max_cost_usd: float | None = setting("TB_AGENT_MAX_COST_USD", None, check=at_least(0.01))

    def __post_init__(self) -> None:
        if self.context_tokens + self.max_output_tokens >= self.context_window:
            raise ConfigError(f"bad configuration: TB_CONTEXT_TOKENS={self.context_tokens} must stay below "
                              f"TB_CONTEXT_WINDOW={self.context_window} less TB_MAX_OUTPUT_TOKENS="
                              f"{self.max_output_tokens}, which the reply needs")

    @property
    def role_max_cost_usd(self) -> dict[str, float]:
        """Role -> its money limit, for the roles given one."""
        limits = {"planner": self.planner_max_cost_usd, "coder": self.coder_max_cost_usd,
                  "reviewer": self.reviewer_max_cost_usd, "agent": self.agent_max_cost_usd}
        return {role: limit for role, limit in limits.items() if limit is not None}


@dataclass(frozen=True)
class Settings:
    model: str = setting("TB_MODEL", default_factory=newest_sonnet)
    limits: RunLimits = field(default_factory=RunLimits)
    max_prompt_chars: int = setting("TB_MAX_PROMPT_CHARS", 20_000, check=at_least(1))
    # Local repositories allowed under these, even off loopback.
    local_roots: tuple[Path, ...] = setting("TB_LOCAL_ROOTS", (), parse=_roots)
    ping_seconds: float = setting("TB_PING_S", 15.0, check=at_least(0.1))
    tool_result_chars: int = 30_000  # a longer tool result is cut to its head and tail before the model sees it
    data_dir: Path = setting("TB_DATA_DIR", Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share"))
                             / "tiny-backspace")
    # The run store: SQLite under data_dir by default; PostgreSQL at this URL, which replicas share.
    database_url: str | None = setting("TB_DATABASE_URL", None, parse=_database_url, repr=False)
    # A replica renews its lease every third of this; another marks its runs interrupted once the lease ran out (or at
    # once, on the same machine, when its process is gone).
    lease_s: float = setting("TB_LEASE_S", 30.0, check=between(1, 600))
    # On SIGTERM, running runs get this long to finish.
    shutdown_grace_s: float = setting("TB_SHUTDOWN_GRACE_S", 30.0, check=at_least(0))
    review_rounds: int = setting("TB_REVIEW_ROUNDS", 2, check=at_least(1))  # coder-reviewer rounds before a draft
    # The most attempts a run may ask for: coders at once, each in a sandbox of its own, for the reviewer to choose.
    max_attempts: int = setting("TB_MAX_ATTEMPTS", 4, check=between(1, 8))
    api_token: str | None = setting("TB_API_TOKEN", None, repr=False)  # bearer token for every endpoint
    github_hosts: tuple[str, ...] = setting("TB_GITHUB_HOSTS", ("github.com",), parse=_names)
    max_runs: int = setting("TB_MAX_RUNS", 20, check=at_least(1))  # runs in flight, in all
    max_runs_per_client: int = setting("TB_MAX_RUNS_PER_CLIENT", 5, check=at_least(1))
    # Runs started per client, refilled continuously.
    rate_per_minute: float = setting("TB_RATE_PER_MINUTE", 30.0, check=at_least(0.01))
    rate_burst: int = setting("TB_RATE_BURST", 10, check=at_least(1))
    planner_model: str | None = setting("TB_PLANNER_MODEL", None)
    coder_model: str | None = setting("TB_CODER_MODEL", None)
    reviewer_model: str | None = setting("TB_REVIEWER_MODEL", None)
    allowed_hosts: tuple[str, ...] = setting("TB_ALLOWED_HOSTS", (), parse=_names)  # served besides loopback names
    # Page origins allowed besides the service's own (a TLS proxy's).
    allowed_origins: tuple[str, ...] = setting("TB_ALLOWED_ORIGINS", (), parse=_origins)
    # For a request's head, and again for its body.
    client_timeout_s: float = setting("TB_CLIENT_TIMEOUT_S", 20.0, check=at_least(0.1))
    # POST /github/webhook: GitHub signs each delivery with this secret (HMAC-SHA256); unset, the webhook is off.
    github_webhook_secret: str | None = setting("GITHUB_WEBHOOK_SECRET", None, repr=False)
    # The @mention in an issue or pull request comment that starts a run.
    github_handle: str = setting("TB_GITHUB_HANDLE", "tiny-backspace", parse=_handle)
    # Where people reach the service's page, for the links in answer comments; unset: the address a delivery came to.
    public_url: str | None = setting("TB_PUBLIC_URL", None, parse=_public_url)
    # A delivery whose comment is older than this is refused: a replay, or one that waited too long.
    webhook_max_age_s: float = setting("TB_WEBHOOK_MAX_AGE_S", 600.0, check=between(1, 86400))

    @property
    def role_models(self) -> dict[str, str]:
        """Role -> model, for the roles given one of their own."""
        models = {"planner": self.planner_model, "coder": self.coder_model, "reviewer": self.reviewer_model}
        return {role: model for role, model in models.items() if model}

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None) -> Settings:
        """The settings of TB_* variables; a `ConfigError` names every bad one."""
        return read(cls, os.environ if env is None else env)
