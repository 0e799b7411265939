"""Settings read once from TB_* environment variables; a bad value fails at start-up with what to set instead."""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import anthropic.types


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


@dataclass(frozen=True)
class RunLimits:
    """The bounds of one run: each stop names the limit that caused it."""

    max_turns: int = 60
    max_tokens: int = 3_000_000  # input + output over the whole run
    run_seconds: float = 1800.0
    tool_seconds: float = 660.0  # exec may take 600 s by itself
    max_output_tokens: int = 16_000  # per model call
    overloaded_retries: int = 3
    overloaded_backoff_s: float = 2.0


@dataclass(frozen=True)
class Settings:
    model: str = field(default_factory=newest_sonnet)
    limits: RunLimits = field(default_factory=RunLimits)
    max_prompt_chars: int = 20_000
    local_roots: tuple[Path, ...] = ()  # local repositories allowed under these, even off loopback
    ping_seconds: float = 15.0
    tool_result_chars: int = 30_000  # a longer tool result is cut to its head and tail before the model sees it
    data_dir: Path = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "tiny-backspace"
    shutdown_grace_s: float = 30.0  # on SIGTERM, running runs get this long to finish
    review_rounds: int = 2  # coder-reviewer rounds before a draft pull request
    api_token: str | None = field(default=None, repr=False)  # TB_API_TOKEN: bearer token for every endpoint
    github_hosts: tuple[str, ...] = ("github.com",)  # hosts whose repository URLs are accepted
    max_runs: int = 20  # runs in flight, in all
    max_runs_per_client: int = 5
    rate_per_minute: float = 30.0  # runs started per client, refilled continuously
    rate_burst: int = 10
    role_models: dict[str, str] = field(default_factory=dict)  # role -> model, from TB_<ROLE>_MODEL
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides loopback ones; "*" for any
    allowed_origins: tuple[str, ...] = ()  # page origins allowed besides the service's own (a TLS proxy's)
    client_timeout_s: float = 20.0  # for a request's head, and again for its body

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def num(name: str, default: float, kind: type = int) -> typing.Any:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SystemExit(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise SystemExit(f"{name} must be positive")
            return value

        d = RunLimits()
        limits = RunLimits(
            max_turns=num("TB_MAX_TURNS", d.max_turns),
            max_tokens=num("TB_MAX_TOKENS", d.max_tokens),
            run_seconds=num("TB_RUN_TIMEOUT_S", d.run_seconds, float),
            tool_seconds=num("TB_TOOL_TIMEOUT_S", d.tool_seconds, float),
            max_output_tokens=num("TB_MAX_OUTPUT_TOKENS", d.max_output_tokens),
            overloaded_retries=num("TB_OVERLOADED_RETRIES", d.overloaded_retries),
            overloaded_backoff_s=num("TB_OVERLOADED_BACKOFF_S", d.overloaded_backoff_s, float),
        )
        roots = tuple(Path(p).resolve() for p in env.get("TB_LOCAL_ROOTS", "").split(":") if p)

        def names(name: str) -> tuple[str, ...]:
            return tuple(n.strip().lower() for n in env.get(name, "").split(",") if n.strip())

        return cls(
            model=env.get("TB_MODEL") or newest_sonnet(),
            limits=limits,
            max_prompt_chars=num("TB_MAX_PROMPT_CHARS", cls.max_prompt_chars),
            local_roots=roots,
            ping_seconds=num("TB_PING_S", cls.ping_seconds, float),
            review_rounds=num("TB_REVIEW_ROUNDS", cls.review_rounds),
            data_dir=Path(env["TB_DATA_DIR"]) if env.get("TB_DATA_DIR") else cls.data_dir,
            api_token=env.get("TB_API_TOKEN") or None,
            github_hosts=tuple(h.strip().lower() for h in env.get("TB_GITHUB_HOSTS", "github.com").split(",")
                               if h.strip()),
            allowed_hosts=names("TB_ALLOWED_HOSTS"),
            allowed_origins=tuple(o.rstrip("/") for o in names("TB_ALLOWED_ORIGINS")),
            client_timeout_s=num("TB_CLIENT_TIMEOUT_S", cls.client_timeout_s, float),
            max_runs=num("TB_MAX_RUNS", cls.max_runs),
            max_runs_per_client=num("TB_MAX_RUNS_PER_CLIENT", cls.max_runs_per_client),
            rate_per_minute=num("TB_RATE_PER_MINUTE", cls.rate_per_minute, float),
            rate_burst=num("TB_RATE_BURST", cls.rate_burst),
            shutdown_grace_s=num("TB_SHUTDOWN_GRACE_S", cls.shutdown_grace_s, float),
            role_models={role: env[f"TB_{role.upper()}_MODEL"] for role in ("planner", "coder", "reviewer")
                         if env.get(f"TB_{role.upper()}_MODEL")},
        )
