"""Sandboxes on Modal: each one a Modal Sandbox with no network, driven through the installed `modal` package.

The repository gets in as it does for the local backend: `clone` fetches it on this machine (with its URL checks
and no credentials), and it travels as one gzipped tarball through the sandbox's filesystem API. No agent's sandbox
ever has the network, and local paths and file:// URLs work as they do locally. A setup (see modal_env) runs once per
key in a sandbox of its own, reaching only the setup allowlist, and the agents' sandbox starts from its snapshot.
Reads, writes and edits run `files` itself in the container (`remote_files`); `list_files` and `search` run ripgrep
there (`listing`), and `export_changes` runs host.py's git script there.

`modal` is imported only when a Modal sandbox is created or reaped, so the other backends never pay for it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncIterable, Mapping
from pathlib import Path
from typing import Any

from common.changeset import MAX_CHANGESET_BYTES, Changeset

from . import files, listing, modal_env, remote_files
from .base import BackendUnavailable, ExecResult, SandboxError, SandboxInfo
from .host import OUTPUT_CAP, SANDBOX_ENV, Limits, Output, _capture, agent_prefix, collect_changes
from .system import run_tool
from .modal_setup import (ModalSettings, ModalUnavailable, has_credentials, image, image_identity, import_modal,
                          why_unavailable)

log = logging.getLogger(__name__)

WORKDIR = "/workspace"
TAG = "tiny-backspace"
UPLOAD_TIMEOUT_S = 300
CALL_TIMEOUT_S = 120  # one file tool or export read; a whole changeset is at most 50 MB
EXEC_GRACE_S = 30  # past the command's own timeout, for Modal to answer
STDIN_CHUNK = 1024 * 1024  # below modal's stdin buffer limit
SETUP_GRACE_S = 900  # a setup sandbox's life past its script's limit: upload, tidying, the secret check, snapshot
SNAPSHOT_TIMEOUT_S = 600  # a large environment takes a while to snapshot
LOOKUP_TIMEOUT_S = 60  # finding and ending the sandboxes of one id that a server left behind
NOT_A_DIRECTORY = b"tb: not a directory"
# $1 directory, $2 timeout, $3 read-only, $4 script. `timeout` gives the command a process group of its own and
# SIGKILLs the whole group at the deadline; what the command left running in the background dies when it returns,
# as in the local jail. Read-only runs as nobody: the repository belongs to root, so it can be read, not written.
EXEC_WRAPPER = r"""
cd -- "$1" 2>/dev/null && [ "$(pwd -P)" = "$1" ] || { printf 'tb: not a directory' >&2; exit 97; }
if [ "$3" = 1 ]; then
  set -- "$2" setpriv --reuid=65534 --regid=65534 --clear-groups -- env HOME=/tmp GIT_CONFIG_COUNT=1 \
    GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*' bash -c "$4"
else
  set -- "$2" bash -c "$4"
fi
timeout -s KILL "$@" & pid=$!
wait "$pid"; code=$?
kill -KILL -- "-$pid" 2>/dev/null
exit "$code"
"""
# The clone's folder is private to its sandbox on this machine (0700); in the container, read-only commands run as
# nobody and must enter it.
UNPACK = 'mkdir -p -- "$1" && tar --no-same-owner -xzf "$2" -C "$1" && chmod 0755 -- "$1" && rm -f -- "$2"'


async def _read_all(stream: AsyncIterable[bytes], cap: int) -> bytes:
    data = bytearray()
    async for chunk in stream:
        data += chunk
        if len(data) > cap:
            raise SandboxError(f"the sandbox sent more than {cap // 1_048_576} MB back")
    return bytes(data)


class _Chunks:
    """`asyncio.StreamReader.read` over a Modal output stream, for host's `_capture`."""

    def __init__(self, stream: AsyncIterable[bytes]):
        self._chunks = aiter(stream)

    async def read(self, _: int) -> bytes:
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return b""


class ModalSandbox:
    backend = "modal"

    def __init__(self, info: SandboxInfo, sandbox: Any, limits: Limits, root: str, environment: bool = False):
        self.info = info
        self.sandbox = sandbox  # a running modal.Sandbox
        self.limits = limits
        self.root = root
        self.environment = environment  # started from a setup's snapshot: commands source its /env/profile
        self._destroyed = False

    @staticmethod
    def workdir_for(repo: Path) -> str:
        return WORKDIR

    @staticmethod
    def check(allow_unsafe: bool) -> None:
        if not has_credentials():
            raise BackendUnavailable("Modal has no credentials: run `modal token new`, or set MODAL_TOKEN_ID and "
                                     "MODAL_TOKEN_SECRET; or set SANDBOX_BACKEND=local")

    @classmethod
    async def open(cls, info: SandboxInfo, repo: Path, settings: ModalSettings, limits: Limits,
                   setup: modal_env.SetupRequest | None = None, on_output: Output | None = None) -> ModalSandbox:
        """A Modal sandbox holding a copy of the clone at `repo`, with the environment `setup` asks for (its
        `info.environment` says how that went); `ModalUnavailable` when Modal cannot give one."""
        modal = import_modal()
        archive = repo.parent / "repo.tgz"
        await run_tool("tar", "-C", str(repo), "-czf", str(archive), ".")
        try:
            try:
                async with asyncio.timeout(settings.create_timeout_s):
                    app = await modal.App.lookup.aio(settings.app_name, create_if_missing=True)
            except Exception as exc:
                raise ModalUnavailable(why_unavailable(exc, modal, settings.create_timeout_s)) from exc
            base = image(modal, settings.image)

            async def start_setup(network: dict[str, Any]) -> ModalSandbox:
                lifetime, name = math.ceil(setup.policy.timeout_s) + SETUP_GRACE_S, f"{info.sandbox_id}.setup"
                sandbox = await _start(modal, app, base, archive, modal_env.SOURCE, settings, _tags(name, lifetime),
                                       lifetime, network)
                return cls(info.model_copy(update={"sandbox_id": name}), sandbox, limits, WORKDIR)

            async def prepare() -> modal_env.Prepared:
                if setup is None:
                    return modal_env.Prepared(None)
                return await modal_env.prepare(setup, repo, image_identity(settings.image), start_setup, on_output)

            async def start(prepared: modal_env.Prepared) -> Any:
                chosen = modal.Image.from_id(prepared.image_id) if prepared.image_id else base
                return await _start(modal, app, chosen, archive, WORKDIR, settings,
                                    _tags(info.sandbox_id, settings.ttl_s), settings.ttl_s, {"block_network": True})

            prepared = await prepare()
            try:
                sandbox = await start(prepared)
            except ModalUnavailable as exc:
                # A cached snapshot Modal no longer has (deleted, or past its TTL) is prepared again, once.
                gone = isinstance(exc.__cause__, modal.exception.NotFoundError)
                if not (gone and prepared.info and prepared.info.cached):
                    raise
                log.warning("environment image %s is gone (%s); preparing it again", prepared.image_id, exc)
                modal_env.snapshots(setup.root).forget(prepared.key)
                prepared = await prepare()
                sandbox = await start(prepared)
        finally:
            archive.unlink(missing_ok=True)
        info = info.model_copy(update={"environment": prepared.info})
        return cls(info, sandbox, limits, WORKDIR, environment=prepared.image_id is not None)

    def _check_alive(self) -> None:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.info.sandbox_id} was destroyed; create a new one")

    async def exec(self, command: str, timeout_s: float, workdir: str, read_only: bool = False,
                   on_output: Output | None = None) -> ExecResult:
        cwd = files.normalize(workdir, allow_root=True)
        where = self.root if cwd == "." else f"{self.root}/{cwd}"
        script = self.limits.shell_prefix() + agent_prefix(self.environment, read_only) + command
        result = await self._run(script, timeout_s, where, read_only, OUTPUT_CAP, on_output)
        if result.exit_code == 97 and result.stderr == NOT_A_DIRECTORY.decode():
            raise SandboxError(f"directory {cwd!r} does not exist or is a symbolic link; use a directory of the "
                               "repository (list_files shows them)")
        return result

    async def run_script(self, script: str, timeout_s: float, env: Mapping[str, str],
                         on_output: Output | None = None) -> ExecResult:
        """Run `script` in the repository with `env` added to the command environment, for this exec alone."""
        return await self._run(self.limits.shell_prefix() + script, timeout_s, self.root, False, OUTPUT_CAP,
                               on_output, {**SANDBOX_ENV, **env})

    async def snapshot(self) -> str:
        """The id of an image of this sandbox's file system, which a later sandbox can start from."""
        self._check_alive()
        try:
            async with asyncio.timeout(SNAPSHOT_TIMEOUT_S + EXEC_GRACE_S):
                taken = await self.sandbox.snapshot_filesystem.aio(timeout=SNAPSHOT_TIMEOUT_S,
                                                                   ttl=modal_env.SNAPSHOT_TTL_S)
        except TimeoutError:
            raise SandboxError(f"snapshot: no answer from Modal within {SNAPSHOT_TIMEOUT_S} s") from None
        except Exception as exc:  # noqa: BLE001
            raise _failed("snapshot", exc) from None
        return taken.object_id

    async def _run(self, script: str, timeout_s: float, where: str, read_only: bool, cap: int,
                   on_output: Output | None = None, env: Mapping[str, str] = SANDBOX_ENV) -> ExecResult:
        self._check_alive()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s + EXEC_GRACE_S):
                proc = await self.sandbox.exec.aio(
                    "bash", "-c", EXEC_WRAPPER, "tb-exec", where, f"{timeout_s:g}", "1" if read_only else "0",
                    script, timeout=math.ceil(timeout_s + EXEC_GRACE_S), env=dict(env), text=False)
                out, err, code = await asyncio.gather(_capture(_Chunks(proc.stdout), cap, on_output),
                                                      _capture(_Chunks(proc.stderr), cap, on_output),
                                                      proc.wait.aio())
        except TimeoutError:
            return ExecResult(exit_code=-1, stdout="", stderr=f"[no answer from Modal within {timeout_s:g} s and "
                              f"{EXEC_GRACE_S} s more]", timed_out=True, truncated=False)
        except Exception as exc:  # noqa: BLE001 - a Modal failure is one the model can read and retry
            raise _failed("exec", exc) from None
        timed_out = code == 137 and time.monotonic() - started >= timeout_s
        stderr = err.text + (f"\n[killed: the command ran past its {timeout_s:g} s timeout]" if timed_out else "")
        return ExecResult(exit_code=-1 if timed_out else code, stdout=out.text, stderr=stderr, timed_out=timed_out,
                          truncated=out.truncated or err.truncated)

    async def _files(self, op: str, *args: Any) -> Any:
        """Run one `files` operation in the container and return its result."""
        self._check_alive()
        data = remote_files.request(self.root, op, *args)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                proc = await self.sandbox.exec.aio("python3", "-I", "-c", remote_files.RUNNER,
                                                   timeout=CALL_TIMEOUT_S, env=SANDBOX_ENV, text=False)
                for i in range(0, len(data), STDIN_CHUNK):
                    proc.stdin.write(data[i:i + STDIN_CHUNK])
                    await proc.stdin.drain.aio()
                proc.stdin.write_eof()
                await proc.stdin.drain.aio()
                out, err, code = await asyncio.gather(_read_all(proc.stdout, 2 * MAX_CHANGESET_BYTES),
                                                      _read_all(proc.stderr, 65536), proc.wait.aio())
        except TimeoutError:
            raise SandboxError(f"{op}: no answer from Modal within {CALL_TIMEOUT_S} s; try again") from None
        except SandboxError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _failed(op, exc) from None
        return remote_files.reply(op, out, err, code)

    async def read_file(self, path: str, offset: int, limit: int) -> str:
        return remote_files.shaped(await self._files("read_text", files.normalize(path), offset, limit), "text")

    async def write_file(self, path: str, content: str) -> int:
        return remote_files.shaped(await self._files("write_text", files.normalize(path), content), "count")

    async def edit_file(self, path: str, old_text: str, new_text: str, replace_all: bool) -> str:
        answer = await self._files("edit_text", files.normalize(path), old_text, new_text, replace_all)
        return remote_files.shaped(answer, "text")

    async def _run_in(self, script: str, timeout_s: float, workdir: str, cap: int) -> ExecResult:
        result = await self._run(script, timeout_s, self.root if workdir == "." else f"{self.root}/{workdir}",
                                 False, cap)
        if result.exit_code == 97 and result.stderr == NOT_A_DIRECTORY.decode():
            raise SandboxError(f"directory {workdir!r} does not exist or is a symbolic link")
        return result

    async def list_files(self, path: str, pattern: str | None) -> tuple[list[str], bool]:
        return await listing.list_files(self._run_in, path, pattern)

    async def search(self, pattern: str, path: str, glob: str | None) -> tuple[list[str], bool]:
        return await listing.search(self._run_in, pattern, path, glob)

    async def export_changes(self) -> tuple[Changeset, str]:
        """Everything that differs from the base commit: untracked files included, ignored ones not."""
        async def read_changed(changed: list[tuple[str, str]]) -> list[bytes]:
            encoded = await self._files("read_changed", changed, MAX_CHANGESET_BYTES)
            if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
                raise SandboxError("could not compute the changes: the sandbox sent malformed contents")
            return [base64.b64decode(e) for e in encoded]

        return await collect_changes(self.info.base_commit,
                                     lambda script, cap: self._run(script, 120, self.root, False, cap), read_changed)

    async def destroy(self) -> None:
        if not self._destroyed:
            self._destroyed = True
            await _terminate(self.sandbox)


async def _start(modal: Any, app: Any, base: Any, archive: Path, dest: str, settings: ModalSettings,
                 tags: dict[str, str], lifetime_s: int, network: dict[str, Any]) -> Any:
    """A running Modal sandbox of the image `base` with the repository of `archive` unpacked at `dest`;
    `ModalUnavailable` (the sandbox terminated again) when Modal cannot give one."""
    sandbox, seconds = None, settings.create_timeout_s
    try:
        async with asyncio.timeout(seconds):
            sandbox = await modal.Sandbox.create.aio(
                app=app, image=base, timeout=lifetime_s, idle_timeout=settings.idle_timeout_s, cpu=settings.cpu,
                memory=settings.memory_mib, workdir=WORKDIR, tags=tags, **network)
        seconds = UPLOAD_TIMEOUT_S
        async with asyncio.timeout(seconds):
            remote = f"/tmp/tb-{tags['sandbox_id']}.tgz"
            await sandbox.filesystem.copy_from_local.aio(str(archive), remote)
            proc = await sandbox.exec.aio("bash", "-c", UNPACK, "tb-unpack", dest, remote, timeout=seconds,
                                          text=False)
            err, code = await asyncio.gather(_read_all(proc.stderr, 65536), proc.wait.aio())
        if code != 0:
            raise ModalUnavailable(f"unpacking the repository failed: {err.decode('utf-8', 'replace')[-300:]}")
    except BaseException as exc:
        if sandbox is not None:
            await asyncio.shield(_terminate(sandbox))
        if isinstance(exc, Exception) and not isinstance(exc, ModalUnavailable):
            raise ModalUnavailable(why_unavailable(exc, modal, seconds)) from exc
        raise
    return sandbox


def _tags(sandbox_id: str, ttl_s: int) -> dict[str, str]:
    return {"app": TAG, "sandbox_id": sandbox_id, "created": str(int(time.time())), "ttl_s": str(ttl_s)}


def _failed(what: str, exc: Exception) -> SandboxError:
    return SandboxError(f"{what} failed on Modal ({type(exc).__name__}: {str(exc)[:300]}); the sandbox may have "
                        "ended (it lives at most SANDBOX_MODAL_TTL_S): create a new one if this persists")


async def _terminate(sandbox: Any) -> bool:
    """End `sandbox`; False when Modal would not (its own timeout and the reaper end it later)."""
    try:
        async with asyncio.timeout(30):
            await sandbox.terminate.aio()
    except Exception as exc:  # noqa: BLE001
        log.warning("could not terminate Modal sandbox %s: %r", getattr(sandbox, "object_id", "?"), exc)
        return False
    return True


async def reap_expired(settings: ModalSettings, now: float | None = None) -> list[str]:
    """Terminate this app's sandboxes that outlived their TTL; their Modal ids.

    Modal's own `timeout` ends each sandbox first; this catches those a crashed or differently configured server
    left behind.
    """
    modal = import_modal()
    now = time.time() if now is None else now
    app = await modal.App.lookup.aio(settings.app_name, create_if_missing=True)
    reaped = []
    async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id, tags={"app": TAG}):
        tags = await sandbox.get_tags.aio()
        try:
            expired = now > float(tags["created"]) + float(tags["ttl_s"])
        except (KeyError, ValueError):
            continue
        if expired:
            log.info("reaping Modal sandbox %s (%s)", sandbox.object_id, tags.get("sandbox_id"))
            await _terminate(sandbox)
            reaped.append(sandbox.object_id)
    return reaped


async def end_tagged(settings: ModalSettings, sandbox_id: str) -> list[str]:
    """Terminate this app's Modal sandboxes tagged with `sandbox_id`, its setup's among them, whoever made them;
    their Modal ids. `SandboxError` when Modal cannot be asked or one would not end.

    For a sandbox this server does not hold: its server died, and another replica cleans up after it.
    """
    modal = import_modal()
    ended, stuck = [], []
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            app = await modal.App.lookup.aio(settings.app_name, create_if_missing=True)
            for name in (sandbox_id, f"{sandbox_id}.setup"):
                async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id, tags={"app": TAG, "sandbox_id": name}):
                    log.info("terminating Modal sandbox %s (%s), left behind", sandbox.object_id, name)
                    (ended if await _terminate(sandbox) else stuck).append(sandbox.object_id)
    except Exception as exc:  # noqa: BLE001 - any failure of Modal's is one the caller can retry
        raise SandboxError(f"could not ask Modal for what is left of sandbox {sandbox_id} "
                           f"({why_unavailable(exc, modal, LOOKUP_TIMEOUT_S)}); try again, or let Modal end it "
                           "(SANDBOX_MODAL_TTL_S)") from None
    if stuck:
        raise SandboxError(f"Modal would not terminate {', '.join(stuck)} of sandbox {sandbox_id}; try again, or let "
                           "Modal end it (SANDBOX_MODAL_TTL_S)")
    return ended
