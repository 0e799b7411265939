"""Tiny Backspace on Modal: the service and its two MCP servers, each a web server of one Modal app.

Create first, then deploy from the project's folder with the project installed (`./tb test` makes .venv):

    # a PostgreSQL database the containers can reach (any managed PostgreSQL): the replicas share runs through it
    modal secret create tiny-backspace TB_API_TOKEN=$(openssl rand -hex 32) ANTHROPIC_API_KEY=sk-ant-... \
        TB_DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DATABASE
    modal secret create tiny-backspace-mcp MCP_AUTH_TOKEN=$(openssl rand -hex 32)
    modal secret create tiny-backspace-github GITHUB_TOKEN=github_pat_...
    modal deploy deploy/modal_app.py

Each secret reaches only the containers that need it: the model key and the database stay with the service, the
GitHub token with the github server; the sandbox server needs no Modal token, as a Modal container's own client is
already signed in. `modal deploy` refuses a secret without its required keys, and the service's container refuses to
start while one of them is empty. The page is at the orchestrator's URL, which `modal deploy` prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import modal

APP_NAME = "tiny-backspace"
SANDBOX_PORT, ORCHESTRATOR_PORT, GITHUB_PORT = 8001, 8002, 8003  # the project's own defaults
# Replicas of the service cooperate through PostgreSQL (admission, leases, commands), so Modal may run several: it
# aims at REPLICA_TARGET_REQUESTS open requests (mostly event streams) per replica, with MIN_REPLICAS always up.
MIN_REPLICAS, MAX_REPLICAS = 1, 4
REPLICA_TARGET_REQUESTS, REPLICA_MAX_REQUESTS = 100, 1000
# A replica idle of requests this long is stopped, with the runs it holds: longer than a run may last (1800 s,
# TB_RUN_TIMEOUT_S), so a run started there ends before its replica can be stopped as idle.
SCALEDOWN_S = 1860
MCP_MAX_REQUESTS = 1000
TIMEOUT_S = 3600  # the longest request: an event stream that follows a run to its end
STARTUP_S = 180  # the service waits up to 60 s for the MCP servers, which may be starting too
PROJECT = Path(__file__).resolve().parents[1]

SECRETS = {"tiny-backspace": ["TB_API_TOKEN", "TB_DATABASE_URL"], "tiny-backspace-mcp": ["MCP_AUTH_TOKEN"],
           "tiny-backspace-github": ["GITHUB_TOKEN"]}
service_secret, mcp_secret, github_secret = (modal.Secret.from_name(name, required_keys=keys)
                                             for name, keys in SECRETS.items())

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("git")  # both servers clone and commit with git
    .pip_install_from_pyproject(str(PROJECT / "pyproject.toml"))
    .pip_install(f"modal=={modal.__version__}")  # the client that deploys is the one the sandbox server runs
    .add_local_python_source("common", "servers", "orchestrator", ignore=["**/__pycache__", "**/*.pyc"])
)
app = modal.App(APP_NAME, image=image)


class MissingSecret(RuntimeError):
    """A secret the service needs is empty; the message says which and where it goes."""


def server_command(module: str, port: int) -> list[str]:
    """An MCP server over streamable HTTP on every address; it refuses to start without MCP_AUTH_TOKEN."""
    return [sys.executable, "-m", module, "--transport", "http", "--host", "0.0.0.0", "--port", str(port)]


def orchestrator_command(port: int, mcp_config: Path) -> list[str]:
    """The service on every address; it refuses to start without TB_API_TOKEN."""
    return [sys.executable, "-m", "orchestrator", "--host", "0.0.0.0", "--port", str(port),
            "--mcp-config", str(mcp_config)]


def mcp_config(urls: Mapping[str, str]) -> dict:
    """mcp.json naming each server by its URL; the service expands `${MCP_AUTH_TOKEN}` from its own environment, so
    the token is never written down."""
    return {"mcpServers": {name: {"type": "http", "url": url.rstrip("/") + "/mcp",
                                  "headers": {"Authorization": "Bearer ${MCP_AUTH_TOKEN}"}}
                           for name, url in urls.items()}}


def service_env(environ: Mapping[str, str], url: str) -> dict[str, str]:
    """The service's environment: ours, answering to the name and page origin of `url` (its Modal address)."""
    needs = {key: name for name in ("tiny-backspace", "tiny-backspace-mcp") for key in SECRETS[name]}
    if missing := [f"{key} (secret {name})" for key, name in needs.items() if not environ.get(key)]:
        raise MissingSecret(f"the service cannot start without {', '.join(missing)}: give the secret all its keys "
                            "again with `modal secret create --force NAME KEY=VALUE ...`, TB_DATABASE_URL a "
                            "PostgreSQL database every replica shares (postgresql://USER:PASSWORD@HOST:5432/DATABASE)")
    parts = urlsplit(url)

    def plus(key: str, value: str) -> str:
        return ",".join(v for v in (environ.get(key, ""), value) if v)

    # Modal's proxy ends TLS: the page's Origin is https, the request the service sees is http.
    return {**environ, "TB_ALLOWED_HOSTS": plus("TB_ALLOWED_HOSTS", parts.hostname or ""),
            "TB_ALLOWED_ORIGINS": plus("TB_ALLOWED_ORIGINS", f"{parts.scheme}://{parts.netloc}"),
            "TB_PUBLIC_URL": environ.get("TB_PUBLIC_URL") or url.rstrip("/")}


def web_url(function: modal.Function) -> str:
    """A web function's URL, looked up where this runs (Modal hydrates the app's functions in its containers)."""
    url = function.get_web_url()
    if not url:
        raise RuntimeError(f"{function} has no web URL: deploy the whole app with `modal deploy {__file__}`")
    return url


def source_folder() -> str:
    """Where the project's packages are: /root in the container, the checkout here."""
    return str(Path(importlib.util.find_spec("orchestrator").origin).parents[1])


@app.function(secrets=[service_secret, mcp_secret], min_containers=MIN_REPLICAS, max_containers=MAX_REPLICAS,
              scaledown_window=SCALEDOWN_S, timeout=TIMEOUT_S)
@modal.concurrent(max_inputs=REPLICA_MAX_REQUESTS, target_inputs=REPLICA_TARGET_REQUESTS)
@modal.web_server(ORCHESTRATOR_PORT, startup_timeout=STARTUP_S)
def orchestrator() -> None:
    """The service and its page, reaching the MCP servers at their web URLs."""
    env = service_env(os.environ, web_url(orchestrator))
    path = Path(tempfile.mkdtemp(prefix="tiny-backspace-")) / "mcp.json"
    path.write_text(json.dumps(mcp_config({"sandbox": web_url(sandbox), "github": web_url(github)}), indent=2))
    subprocess.Popen(orchestrator_command(ORCHESTRATOR_PORT, path), env=env, cwd=source_folder())


# Each MCP server keeps its sessions in memory, and the sandbox server its sandboxes too: every request of a session
# must reach the same process, so each runs in one container, taking many requests at once. The service's liveness
# listings (every 10 s) keep both up while a replica is.
@app.function(secrets=[mcp_secret], max_containers=1, timeout=TIMEOUT_S)
@modal.concurrent(max_inputs=MCP_MAX_REQUESTS)
@modal.web_server(SANDBOX_PORT, startup_timeout=60)
def sandbox() -> None:
    """The sandbox server; commands run in Modal sandboxes, the repository is only cloned here to be sent there."""
    # The clone here is only a staging copy for its Modal sandbox: no volume of its own (a loop-mounted file system).
    env = {**os.environ, "SANDBOX_BACKEND": "modal", "SANDBOX_DISK_MIB": os.environ.get("SANDBOX_DISK_MIB", "0")}
    subprocess.Popen(server_command("servers.sandbox", SANDBOX_PORT), env=env, cwd=source_folder())


@app.function(secrets=[mcp_secret, github_secret], max_containers=1, timeout=TIMEOUT_S)
@modal.concurrent(max_inputs=MCP_MAX_REQUESTS)
@modal.web_server(GITHUB_PORT, startup_timeout=60)
def github() -> None:
    """The github server, writing branches and pull requests with GITHUB_TOKEN."""
    subprocess.Popen(server_command("servers.github", GITHUB_PORT), env=dict(os.environ), cwd=source_folder())
