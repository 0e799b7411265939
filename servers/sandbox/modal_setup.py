"""What choosing Modal needs before any sandbox exists: its settings, whether a token is configured, the image,
and why Modal could not give a sandbox, none of which imports `modal` until a sandbox is really asked of it."""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.settings import at_least, setting


# The default image: Debian slim with this Python, and what the file tools and search need.
DEFAULT_PYTHON = "3.12"
DEFAULT_PACKAGES = ("git", "ripgrep")


class ModalUnavailable(Exception):
    """Modal could not give us a sandbox; the message says why, for the operator and the run's `sandbox` event."""


@dataclass(frozen=True)
class ModalSettings:
    """Read once from SANDBOX_MODAL_* environment variables."""

    app_name: str = setting("SANDBOX_MODAL_APP", "tiny-backspace-sandboxes")
    # A registry image or a Dockerfile path; Debian slim with git, ripgrep and Python if None.
    image: str | None = setting("SANDBOX_MODAL_IMAGE", None)
    create_timeout_s: float = setting("SANDBOX_MODAL_CREATE_TIMEOUT_S", 120, check=at_least(1))  # a first start builds
    # Modal ends a sandbox this long after its start, and the reaper ends what outlived it.
    ttl_s: int = setting("SANDBOX_MODAL_TTL_S", 3600, check=at_least(60))
    idle_timeout_s: int = setting("SANDBOX_MODAL_IDLE_TIMEOUT_S", 1800, check=at_least(60))
    cpu: float = setting("SANDBOX_MODAL_CPU", 1.0, check=at_least(0.125))
    memory_mib: int = setting("SANDBOX_MODAL_MEMORY_MIB", 2048, check=at_least(128))


def has_credentials(env: Mapping[str, str] | None = None) -> bool:
    """Whether a Modal token is configured (MODAL_TOKEN_ID/SECRET or the active profile of ~/.modal.toml), read
    the way modal/config.py reads it but without importing `modal` or touching the network; or whether this runs in
    a Modal container (MODAL_IS_REMOTE), where the client needs none."""
    env = os.environ if env is None else env
    if env.get("MODAL_IS_REMOTE") == "1":  # inside a Modal container, whose client signs in by itself
        return True
    profile: dict[str, Any] = {}
    path = Path(env.get("MODAL_CONFIG_PATH") or os.path.expanduser("~/.modal.toml"))
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        profiles = {}
    active = next((name for name, p in profiles.items() if isinstance(p, dict) and p.get("active") is True), "default")
    if isinstance(found := profiles.get(env.get("MODAL_PROFILE") or active), dict):
        profile = found
    def given(name: str) -> str:  # a client that does not expand variables passes mcp.json's placeholder through
        value = env.get(name, "")
        return "" if value.startswith("${") else value

    return bool((given("MODAL_TOKEN_ID") or profile.get("token_id"))
                and (given("MODAL_TOKEN_SECRET") or profile.get("token_secret")))


def import_modal() -> Any:
    # An mcp.json `${MODAL_TOKEN_ID}` with nothing behind it arrives as an empty variable, which modal would take
    # over the profile's token.
    for key in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        if os.environ.get(key) == "":
            del os.environ[key]
    import modal

    return modal


def _is_dockerfile(spec: str) -> bool:
    return spec.endswith("Dockerfile") or Path(spec).is_file()


def image(modal: Any, spec: str | None) -> Any:
    if not spec:
        return modal.Image.debian_slim(python_version=DEFAULT_PYTHON).apt_install(*DEFAULT_PACKAGES)
    if _is_dockerfile(spec):
        return modal.Image.from_dockerfile(spec)
    return modal.Image.from_registry(spec)


def image_identity(spec: str | None) -> str:
    """The toolchain a prepared environment depends on: the default image's definition, a Dockerfile's content, or
    a registry name (a tag moved to another image is not noticed; pin a digest to be sure)."""
    if not spec:
        return f"modal:debian_slim({DEFAULT_PYTHON})+{','.join(DEFAULT_PACKAGES)}"
    if _is_dockerfile(spec):
        try:
            return "modal:dockerfile:" + hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        except OSError:
            return f"modal:dockerfile:{spec}"  # `image` fails on it too, with Modal's own message
    return f"modal:registry:{spec}"


def why_unavailable(exc: BaseException, modal: Any, seconds: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer from Modal within {seconds:g} s"
    if isinstance(exc, modal.exception.AuthError):
        return f"authentication failed: {str(exc)[:300]}"
    return f"API error: {type(exc).__name__}: {str(exc)[:300]}"
