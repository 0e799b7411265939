"""The service's parts, assembled once from the settings and mcp.json, for the server (`__main__`) and the command
line (`cli`) alike: the MCP tool pool and the model every run shares."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from mcp import StdioServerParameters

from common.settings import ConfigError as BadSettings

from .config import Settings
from .mcp_pool import ConfigError, ToolPool, load_config
from .model import AnthropicModel, anthropic_client
from .replay import TrajectoryError, is_replay
from .replay import load as load_replay
from .run import Services
from .store import StoreError

log = logging.getLogger("orchestrator")


class StartupError(Exception):
    """The service or the command line cannot start; the message says what to do."""


STARTUP_ERRORS = (StartupError, ConfigError, StoreError, TrajectoryError)


def find_mcp_config() -> Path:
    """The mcp.json to use when none is named: the user's own when present, else the project's. Never one in the
    current folder: that is the user's repository, whose mcp.json (if any) is not ours."""
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tiny-backspace" / "mcp.json"
    project = Path(__file__).resolve().parent.parent / "mcp.json"
    for path in (user, project):
        if path.is_file():
            return path
    raise ConfigError(f"no mcp.json at {user} or {project}: pass --mcp-config PATH, or copy the project's mcp.json "
                      f"to {user} with absolute commands")


def settings_from_env() -> Settings:
    """The settings, or a `StartupError` naming the variable whose value cannot be used."""
    try:
        return Settings.from_env()
    except BadSettings as exc:  # bad TB_* values
        raise StartupError(f"{exc}: correct them, or unset them for the defaults") from None


def build_services(settings: Settings, mcp_config: Path | None = None) -> Services:
    """The MCP tool pool (not yet started) and the model, as every run shares them."""
    path = mcp_config or find_mcp_config()
    specs = load_config(path)
    for spec in specs:
        # Found now rather than after START_SECONDS of a server that cannot start.
        if isinstance(spec.target, StdioServerParameters) and shutil.which(spec.target.command) is None:
            raise ConfigError(f"{path} starts the {spec.name} server with {spec.target.command}, which is not "
                              "there: run ./tb serve once in the project (it makes .venv), or correct the command")
    pool = ToolPool(specs)
    if is_replay(settings.model):
        return Services(settings, pool, load_replay(settings.model))
    client, problem = anthropic_client()
    if problem:
        log.warning("runs are refused until a model is usable: %s", problem)
    model = AnthropicModel(client, settings.model, settings.limits.max_output_tokens,
                           settings.limits.overloaded_retries, settings.limits.overloaded_backoff_s)
    return Services(settings, pool, model, model_problem=problem)
