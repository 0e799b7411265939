"""A sandbox's setup phase: find its environment in the cache, or build it in the sandbox's own jail (same uid,
same budget) with a way out through the egress proxy to allowlisted hosts only; then every later command of the
sandbox sees it read-only at /env, with no network at all.

A setup that fails is a result, not an error: the sandbox is made without an environment and says why.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.redact import Redactor, encodings, secret_values

from . import allowlist, egress, environment, files, volume
from .base import EnvironmentInfo, SandboxError
from .envcache import EnvCache
from .host import HostSandbox, Output, SetupMounts
from .local import EGRESS_SOCKET, SOURCE, WORKDIR
from .system import run_tool

TAIL_CHARS = 2000
SCRIPT_CHARS = 20_000  # of a declared script, shown in the result
PLAN_READ_BYTES = 16 * 1024 * 1024  # lockfiles of large projects run to megabytes


class SetupFailed(Exception):
    """The setup ran and failed; the message says how, `tail` holds the end of its output."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


@dataclass(frozen=True)
class SetupPolicy:
    """The operator's rules for every setup."""

    allow: allowlist.Allowlist
    timeout_s: float
    secrets: Mapping[str, str]  # variables given to the setup alone (a private index's token)


def read_plan(repo: Path, requested: str | None) -> environment.Plan | None:
    """The setup a repository asks for (see `environment.plan`); call it as the sandbox's own user, off the event
    loop (`HostSandbox._in_thread`): it may read megabytes of lockfiles."""
    def read(path: str) -> bytes | None:
        try:
            return files.read_bytes(repo, path, PLAN_READ_BYTES)
        except (SandboxError, OSError):
            return None
    return environment.plan(requested, read)


async def prepare(sandbox: HostSandbox, plan: environment.Plan, repo: str, cache: EnvCache, policy: SetupPolicy,
                  on_output: Output | None = None) -> EnvironmentInfo:
    """The sandbox's environment, from the cache or built now; `on_output` gets the setup's output as it runs."""
    started = time.monotonic()
    script = plan.script if len(plan.script) <= SCRIPT_CHARS else plan.script[:SCRIPT_CHARS] + "\n… [cut]\n"
    info = EnvironmentInfo(status="ready", source=plan.source, detected=plan.detected, script=script,
                           test_commands=plan.test_commands)
    key = plan.key(repo, environment.toolchain())
    redact = Redactor([*secret_values(), *policy.secrets.values()])
    try:
        lease = await cache.get(key, lambda folder: _build(sandbox, plan, folder, policy, on_output, redact))
    except SetupFailed as exc:
        return info.model_copy(update={"status": "failed", "error": redact(str(exc)), "output_tail": exc.tail,
                                       "test_commands": [],
                                       "duration_s": round(time.monotonic() - started, 3)})
    except SandboxError as exc:
        return info.model_copy(update={"status": "failed", "error": redact(f"setup could not run: {exc}"),
                                       "test_commands": [],
                                       "duration_s": round(time.monotonic() - started, 3)})
    if sandbox.destroyed:  # while its environment was made: nothing is left to give it to
        lease.release()
        return info.model_copy(update={"status": "failed", "error": "the sandbox was destroyed during its setup"})
    try:
        sandbox.use_environment(await _view(sandbox, lease.path, read_only=True), lease.release)
    except BaseException:
        lease.release()
        raise
    if lease.cached and on_output is not None:
        on_output(f"environment {key[:12]} from the cache (prepared in {lease.meta.get('duration_s', 0):g} s)\n")
    return info.model_copy(update={"cached": lease.cached, "installed": lease.meta.get("installed", []),
                                   "output_tail": "" if lease.cached else lease.meta.get("output_tail", ""),
                                   "duration_s": round(time.monotonic() - started, 3)})


def compose_script(plan: environment.Plan, secrets: Mapping[str, str], egress_prefix: str) -> str:
    """The whole script a setup runs: the secrets it is given, the way to the network, its copy of the repository,
    then the plan's own script."""
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in secrets.items())
    return (f"umask 022\nexport TB_ENV={environment.ENV_DIR}\n{exports}{egress_prefix}\n"
            f"cp -a {SOURCE}/. {WORKDIR}/ || "
            "{ echo 'setup: could not copy the repository' >&2; exit 1; }\n"
            f"touch {environment.ENV_DIR}/profile\n{plan.script}\n")


async def _build(sandbox: HostSandbox, plan: environment.Plan, folder: Path, policy: SetupPolicy,
                 on_output: Output | None, redact: Redactor) -> dict[str, Any]:
    """Run the setup into `folder`; what it installed, or `SetupFailed`."""
    started = time.monotonic()
    if sandbox.owner:
        await run_tool("chown", f"{sandbox.owner[0]}:{sandbox.owner[1]}", "--", str(folder))
    view = await _view(sandbox, folder, read_only=False)
    try:
        return await _run_setup(sandbox, plan, view, policy, on_output, redact, started)
    finally:
        if view != folder:  # the cache checks and keeps the volume once nothing else holds it
            await volume.unmount_under(view)


async def _run_setup(sandbox: HostSandbox, plan: environment.Plan, folder: Path, policy: SetupPolicy,
                     on_output: Output | None, redact: Redactor, started: float) -> dict[str, Any]:
    socket = sandbox.home / "egress.sock"
    proxy = await egress.start(socket, policy.allow, on_log=_lines_to(on_output), owner=sandbox.owner)
    try:
        result = await sandbox.run(compose_script(plan, policy.secrets, egress.jail_prefix(EGRESS_SOCKET)),
                                   policy.timeout_s, on_output=on_output, setup=SetupMounts(folder, socket))
    finally:
        await proxy.close()
        socket.unlink(missing_ok=True)
    tail = redact((result.stdout + result.stderr)[-TAIL_CHARS:])  # kept in the cache's records, and shown
    if result.timed_out:
        raise SetupFailed(f"setup ran past its {policy.timeout_s:g} s limit (SANDBOX_SETUP_TIMEOUT_S); make it "
                          "faster or raise the limit", tail)
    if result.exit_code != 0:
        last = next((line for text in (result.stderr, result.stdout) for line in reversed(text.splitlines())
                     if line.strip()), "(it printed nothing)")
        refused = ("; " + "; ".join(line.removeprefix("egress: ") for line in proxy.refused[:3])
                   if proxy.refused else "")
        raise SetupFailed(f"setup failed (exit {result.exit_code}): {last.strip()[:500]}{refused}", tail)
    no_network = SetupMounts(folder, None)
    # Readable by every later sandbox's uid, writable by none, no setuid: and so no file hides from the scan below
    # by a mode that keeps out only its owner.
    await sandbox.run(f"chmod -R u+rwX,go+rX,go-w,ug-s {environment.ENV_DIR} 2>/dev/null; true", 120,
                      setup=no_network)
    if policy.secrets:
        await _refuse_kept_secrets(sandbox, policy, no_network)
    inventory = await sandbox.run(environment.INVENTORY, 120, setup=no_network)
    return {"installed": [redact(line) for line in inventory.stdout.splitlines() if line.strip()][:20],
            "duration_s": round(time.monotonic() - started, 3), "output_tail": tail}


async def _refuse_kept_secrets(sandbox: HostSandbox, policy: SetupPolicy, jail: SetupMounts) -> None:
    """Fail a setup that wrote one of its secrets into the environment, which every agent would then read."""
    forms = sorted({form for value in policy.secrets.values() for form in encodings(value)})
    patterns = "".join(f" -e {shlex.quote(form)}" for form in forms)
    found = await sandbox.run(f"grep -rlsF{patterns} {environment.ENV_DIR} | head -20", 120, setup=jail)
    if found.stdout.strip():
        names = ", ".join(found.stdout.split()[:5])
        raise SetupFailed(f"setup left a secret given to setup alone ({', '.join(policy.secrets)}) in the "
                          f"environment ({names}), where the agents would read it; write credentials under $HOME "
                          "(discarded when setup ends), never under /env")


async def _view(sandbox: HostSandbox, source: Path, read_only: bool) -> Path:
    """Where the sandbox's jail finds `source`: a bind mount in the sandbox's home, under a folder only its uid may
    enter, since the cache itself is private to the server. A server that is not root runs jails as itself and
    binds `source` directly."""
    if os.geteuid() != 0 or sandbox.owner is None:
        return source
    private = sandbox.home / "env-view"
    private.mkdir(mode=0o700, exist_ok=True)
    os.chown(private, *sandbox.owner)
    view = private / "env"
    view.mkdir(exist_ok=True)
    await run_tool("mount", "--bind", str(source), str(view))
    await run_tool("mount", "-o", f"remount,bind,nosuid,nodev{',ro' if read_only else ''}", str(view))
    return view


def _lines_to(on_output: Output | None):
    if on_output is None:
        return None
    return lambda line: on_output(line.rstrip("\n") + "\n")
