"""The setup phase on Modal: the environment a setup prepares is kept as a snapshot of its sandbox's file system, and
every later sandbox of the same key starts from that image.

A setup runs in a Modal sandbox of its own whose only way out is Modal's outbound allowlist, made from the operator's
SANDBOX_SETUP_ALLOW: on Modal that allowlist is the egress proxy. It runs the script the local backend composes, in a
copy of the repository at /workspace (so what it records of its working directory, like an editable install, points
where the agents' repository will be); the secrets of SANDBOX_SETUP_ENV reach that one command through its
environment, never a file. Then the copy, $HOME and /tmp are removed, whatever the setup left anywhere else is checked
for those secrets (a snapshot keeps the whole file system, not only /env), and the rest is snapshotted. The agents'
sandbox starts from the snapshot with no network, as every Modal sandbox does, and its commands source /env/profile.

Snapshot ids are kept by key in this process and in `<root>/envs/modal/<key>.json`, so that another server on the same
root reuses them (a folder of their own: the local cache counts every `envs/*.json` as one of its environments).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.redact import Redactor, encodings, secret_values

from . import allowlist, environment
from .base import EnvironmentInfo, ExecResult, SandboxError
from .envcache import SingleFlight
from .host import Output
from .local import SOURCE, WORKDIR
from .modal_setup import ModalUnavailable
from .prepare import TAIL_CHARS, SetupFailed, SetupPolicy, compose_script, read_plan

log = logging.getLogger(__name__)

SNAPSHOT_TTL_S = 30 * 24 * 3600  # how long Modal keeps a snapshot (its default, asked for explicitly)
TTL_MARGIN_S = 24 * 3600  # a record this close to its snapshot's end is prepared again rather than trusted
STEP_TIMEOUT_S = 300  # tidying, the secret check and the inventory, each
MARK = "/run/tb-setup.mark"  # made as the setup starts: what changed after it is what the setup left
SETUP_ENV = {"HOME": "/tmp"}  # as in the local jail: whatever lands in $HOME is removed with /tmp
ENV = environment.ENV_DIR
# The repository copy goes; what the agents' sandbox must not start with goes too. /node_modules is on the resolution
# path of everything under /workspace, as the local jail links it.
TIDY = f"""set -e
rm -rf -- {SOURCE} {WORKDIR}
mkdir -m 0755 {WORKDIR}
find /tmp /var/tmp -mindepth 1 -delete 2>/dev/null || true
if [ -d {ENV}/node_modules ]; then ln -sfn {ENV}/node_modules /node_modules; fi
"""
# Every file changed since the setup started, wherever it is; $TB_FORMS holds the secrets' forms, one a line.
SCAN = f"""[ -f {MARK} ] || {{ echo 'the setup removed {MARK}, which dates its changes' >&2; exit 2; }}
find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -cnewer {MARK} -print0 2>/dev/null \\
  | xargs -0r grep -lsF -e "$TB_FORMS" -- | head -20
"""
INVENTORY = f"rm -f {MARK}\n{environment.INVENTORY}"


@dataclass(frozen=True)
class SetupRequest:
    """What a Modal sandbox's setup phase needs from the server."""

    requested: str | None  # the request's setup script; None: the repository's own or a detected one
    repo_url: str
    policy: SetupPolicy
    root: Path  # the sandbox root, under which the snapshot ids are kept


class SetupHost(Protocol):
    """A running setup sandbox holding the repository at SOURCE (see modal_backend.ModalSandbox)."""

    async def run_script(self, script: str, timeout_s: float, env: Mapping[str, str],
                         on_output: Output | None = None) -> ExecResult: ...
    async def snapshot(self) -> str: ...
    async def destroy(self) -> None: ...


StartSetup = Callable[[dict[str, Any]], Awaitable[SetupHost]]  # Sandbox.create's network arguments -> a setup host


@dataclass
class Prepared:
    """A sandbox's environment (None: setup is off), and the image to start it from (None: the base image)."""

    info: EnvironmentInfo | None
    image_id: str | None = None
    key: str | None = None


def network(allow: allowlist.Allowlist) -> dict[str, Any]:
    """Sandbox.create's network arguments for a setup: the allowlist's names (`*.domain` for a rule's subdomains) and
    its addresses as one-host CIDRs. Both lists always go, even empty, so that Modal allows nothing else; Modal's
    lists name no ports, so a rule's port is not enforced."""
    domains, cidrs = [], []
    for rule in allow.rules:
        if rule.address is not None:
            cidrs.append(f"{rule.address}/{rule.address.max_prefixlen}")
        else:
            domains.append("*" + rule.host if rule.host.startswith(".") else rule.host)
    return {"block_network": False, "outbound_domain_allowlist": list(dict.fromkeys(domains)),
            "outbound_cidr_allowlist": list(dict.fromkeys(cidrs))}


def setup_script(plan: environment.Plan) -> str:
    """The local backend's setup script, without its egress bridge (Modal's allowlist is the way out) and without
    the secrets, which travel in the command's environment."""
    return f"mkdir -p -m 0755 {ENV}\n: > {MARK}\n" + compose_script(plan, {}, "")


async def prepare(request: SetupRequest, repo: Path, toolchain: str, start: StartSetup,
                  on_output: Output | None = None) -> Prepared:
    """The environment of the clone at `repo`: a snapshot from the cache, or one made now by a setup sandbox from
    `start`. A failed setup is reported in the result, which then names no image."""
    plan = await asyncio.to_thread(read_plan, repo, request.requested)  # megabytes of lockfiles, off the loop
    if plan is None:
        return Prepared(EnvironmentInfo(status="none", source="none"))
    started = time.monotonic()
    info = EnvironmentInfo(status="ready", source=plan.source, detected=plan.detected, script=plan.script,
                           test_commands=plan.test_commands)
    key = plan.key(request.repo_url, toolchain)
    policy = request.policy
    redact = Redactor([*secret_values(), *policy.secrets.values()])
    try:
        record, cached = await snapshots(request.root).get(
            key, lambda: _build(plan, policy, start, on_output, redact))
    except SetupFailed as exc:
        return Prepared(_failed(info, redact(str(exc)), started, exc.tail))
    except (SandboxError, ModalUnavailable) as exc:
        return Prepared(_failed(info, redact(f"setup could not run on Modal: {exc}"), started))
    if cached and on_output is not None:
        on_output(f"environment {key[:12]} from the cache (prepared in {record.get('duration_s', 0):g} s)\n")
    return Prepared(info.model_copy(update={
        "cached": cached, "installed": record.get("installed", []),
        "output_tail": "" if cached else record.get("output_tail", ""),
        "duration_s": round(time.monotonic() - started, 3)}), record["image_id"], key)


def _failed(info: EnvironmentInfo, error: str, started: float, tail: str = "") -> EnvironmentInfo:
    return info.model_copy(update={"status": "failed", "error": error, "output_tail": tail,
                                   "duration_s": round(time.monotonic() - started, 3)})


async def _build(plan: environment.Plan, policy: SetupPolicy, start: StartSetup, on_output: Output | None,
                 redact: Redactor) -> dict[str, Any]:
    """Run the setup in a sandbox of its own and snapshot what it left; its record, or `SetupFailed`."""
    started = time.monotonic()
    host = await start(network(policy.allow))
    try:
        result = await host.run_script(setup_script(plan), policy.timeout_s, {**SETUP_ENV, **policy.secrets},
                                       on_output)
        tail = redact((result.stdout + result.stderr)[-TAIL_CHARS:])
        if result.timed_out:
            raise SetupFailed(f"setup ran past its {policy.timeout_s:g} s limit (SANDBOX_SETUP_TIMEOUT_S); make it "
                              "faster or raise the limit", tail)
        if result.exit_code != 0:
            last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
            raise SetupFailed(f"setup failed (exit {result.exit_code}): {last.strip()[:500]}; on Modal it reaches "
                              "only the hosts of SANDBOX_SETUP_ALLOW", tail)
        await _step(host, TIDY, "removing the setup's scratch files")
        if policy.secrets:
            await _refuse_kept_secrets(host, policy)
        inventory = await _step(host, INVENTORY, "listing what the setup installed")
        image_id = await host.snapshot()
    finally:
        await asyncio.shield(host.destroy())
    return {"image_id": image_id, "installed": [line for line in inventory.splitlines() if line.strip()][:20],
            "duration_s": round(time.monotonic() - started, 3), "output_tail": tail, "created": time.time()}


async def _step(host: SetupHost, script: str, what: str, env: Mapping[str, str] | None = None) -> str:
    result = await host.run_script(script, STEP_TIMEOUT_S, env or {})
    if result.exit_code != 0:
        raise SandboxError(f"{what} failed (exit {result.exit_code}): {result.stderr.strip()[-300:]}")
    return result.stdout


async def _refuse_kept_secrets(host: SetupHost, policy: SetupPolicy) -> None:
    """Fail a setup that left one of its secrets in a file: the snapshot, and every agent after it, would keep it."""
    forms = sorted({form for value in policy.secrets.values() for form in encodings(value)})
    found = await _step(host, SCAN, "checking the environment for secrets", {"TB_FORMS": "\n".join(forms)})
    if found.strip():
        names = ", ".join(found.split()[:5])
        raise SetupFailed(f"setup left a secret given to setup alone ({', '.join(policy.secrets)}) in files the "
                          f"agents' sandbox would start with ({names}); write credentials under $HOME (removed "
                          f"when setup ends), never under {ENV} or elsewhere")


class Snapshots:
    """Snapshot records by key (image id, what it holds): this process's, each also kept as a JSON file."""

    def __init__(self, folder: Path):
        self.dir = folder
        self._known: dict[str, dict[str, Any]] = {}
        self._flights = SingleFlight()

    async def get(self, key: str, build: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[dict[str, Any], bool]:
        """The record of `key` and whether it was there already, made by `build()` when not. Callers asking for the
        same key meanwhile wait for that one build and share its result, or its failure."""
        async def lookup() -> tuple[dict[str, Any], bool] | None:
            record = self._lookup(key)
            return None if record is None else (record, True)

        async def make() -> tuple[dict[str, Any], bool]:
            record = await build()
            self._keep(key, record)
            return record, False

        return await self._flights.run(key, lookup, make)

    def forget(self, key: str) -> None:
        """Drop a record whose image Modal no longer has."""
        self._known.pop(key, None)
        (self.dir / f"{key}.json").unlink(missing_ok=True)

    def _lookup(self, key: str) -> dict[str, Any] | None:
        record = self._known.get(key)
        if record is None:
            try:
                record = json.loads((self.dir / f"{key}.json").read_text())
            except (OSError, ValueError):
                return None
        try:
            fresh = time.time() - float(record["created"]) < SNAPSHOT_TTL_S - TTL_MARGIN_S
            usable = fresh and isinstance(record["image_id"], str)
        except (KeyError, TypeError, ValueError):
            usable = False
        if not usable:
            self.forget(key)
            return None
        self._known[key] = record
        return record

    def _keep(self, key: str, record: dict[str, Any]) -> None:
        self._known[key] = record
        try:
            self.dir.mkdir(mode=0o711, parents=True, exist_ok=True)
            staged = self.dir / f".{key}.{secrets.token_hex(4)}"
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            staged.rename(self.dir / f"{key}.json")
        except OSError as exc:  # this server still reuses it; others prepare their own
            log.warning("could not keep the record of environment %s (%s)", key, exc)


_SNAPSHOTS: dict[Path, Snapshots] = {}


def snapshots(root: Path) -> Snapshots:
    """The snapshot records of the sandbox root `root`, one set per process."""
    folder = root / "envs" / "modal"
    if folder not in _SNAPSHOTS:
        _SNAPSHOTS[folder] = Snapshots(folder)
    return _SNAPSHOTS[folder]
