"""A Modal that runs here: autospecs of the installed `modal` classes whose sandboxes are containers on this machine.

Every call the adapter makes goes through `create_autospec`, so a parameter name or call shape the installed `modal`
does not accept fails the test. Each sandbox is a bubblewrap container over a root file system of its own (a folder,
with this machine's /usr and /etc read-only in it): what the adapter sends into the container (the exec wrapper, the
file-tool runner, git, tar, a setup script) really runs there, each exec a process of its own with its own `env`, and
`snapshot_filesystem` copies that folder into an image that a later `create` starts from.

What the installed client or Modal's documentation refuses, the fake refuses too:
- every argument of `Sandbox.create` that `modal`'s own `SandboxCreateCommon` rejects, among them `block_network=True`
  together with `outbound_domain_allowlist` or `outbound_cidr_allowlist`, even an empty one (InvalidError);
- an allowlist entry that is neither a domain name (`*.` prefix allowed, or `*` alone, as Sandbox.create's docstring
  says) nor a CIDR (InvalidError; our reading of the documentation, which the client does not check);
- an image id no image has (NotFoundError, when `create` loads what `Image.from_id` named);
- exec, upload and snapshot on a sandbox that was terminated (ConflictError, as `get_task_id` raises for a finished
  sandbox).
A sandbox created with `block_network=True` has no network at all (a network namespace of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import ipaddress
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from unittest.mock import create_autospec

import modal
import pytest
from modal._outbound_policy import _DOMAIN_RE
from modal.container_process import ContainerProcess
from modal.io_streams import StreamReader, StreamWriter
from modal.sandbox._common import SandboxCreateArgs, SandboxCreateCommon
from modal.sandbox.sandbox import SandboxFilesystem
from modal_proto import api_pb2

# The real classes, kept before a test replaces them in the `modal` module.
App, Image, Sandbox = modal.App, modal.Image, modal.Sandbox
CREATE_ARGS = {f.name for f in dataclasses.fields(SandboxCreateArgs)}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOPS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
BLOCKED = api_pb2.NetworkAccess.NetworkAccessType.BLOCKED


def _bind_aio(fake: object, cls: type, *names: str) -> None:
    """Give `fake.<name>.aio` the signature of the real bound method: an instance autospec keeps `self` in it, which
    would shift every positional argument by one."""
    for name in names:
        signature = inspect.signature(getattr(cls, name).aio)

        async def method(*args: object, **kwargs: object) -> None: ...

        method.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
        getattr(fake, name).aio = create_autospec(method)


def _reader(stream: asyncio.StreamReader) -> StreamReader:
    reader = create_autospec(StreamReader, instance=True)

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await stream.read(65536):
            yield chunk

    reader.__aiter__ = lambda *_: chunks()
    return reader


def _process(proc: asyncio.subprocess.Process) -> ContainerProcess:
    fake = create_autospec(ContainerProcess, instance=True)
    fake.stdout, fake.stderr = _reader(proc.stdout), _reader(proc.stderr)
    fake.stdin = create_autospec(StreamWriter, instance=True)
    _bind_aio(fake, ContainerProcess, "wait")
    _bind_aio(fake.stdin, StreamWriter, "drain")
    buffered, closed = bytearray(), []
    fake.stdin.write.side_effect = buffered.extend
    fake.stdin.write_eof.side_effect = lambda: closed.append(True)

    async def drain() -> None:
        proc.stdin.write(bytes(buffered))
        buffered.clear()
        await proc.stdin.drain()
        if closed:
            proc.stdin.close()

    async def wait() -> int:
        code = await proc.wait()
        proc.stdin.close()
        return 128 - code if code < 0 else code  # Modal reports a signal as 128 + its number

    fake.stdin.drain.aio.side_effect = drain
    fake.wait.aio.side_effect = wait
    return fake


def _empty_root(folder: Path) -> None:
    """The base image: mount points for this machine's /usr and /etc, its /bin… links, and empty /tmp, /root, /run."""
    for name in ("usr", "etc", "proc", "dev", "root", "run", "var/tmp"):
        (folder / name).mkdir(parents=True)
    (folder / "tmp").mkdir()
    os.chmod(folder / "tmp", 0o1777)
    for top in TOPS:
        if os.path.islink(top):
            (folder / top[1:]).symlink_to(os.readlink(top))
        elif os.path.isdir(top):
            (folder / top[1:]).mkdir()


@dataclass
class Container:
    """One fake sandbox: its root file system and how `create` configured it."""

    object_id: str
    root: Path
    network: api_pb2.NetworkAccess
    workdir: str = "/"
    terminated: bool = False
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    def jail(self, cwd: str) -> list[str]:
        argv = [shutil.which("bwrap") or "bwrap", "--bind", str(self.root), "/",
                "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for top in TOPS:
            if os.path.isdir(top) and not os.path.islink(top):
                argv += ["--ro-bind", top, top]
        argv += ["--proc", "/proc", "--dev", "/dev", "--die-with-parent", "--chdir", cwd]
        if self.network.network_access_type == BLOCKED:
            argv.append("--unshare-net")
        return [*argv, "--"]

    def check_running(self) -> None:
        if self.terminated:
            raise modal.exception.ConflictError("Sandbox already finished")


class LocalModal:
    """The `modal` module's App, Image and Sandbox replaced by autospecs; `sandboxes` holds those created, `images`
    the snapshots taken (id -> root folder), `containers` each sandbox's state by its id."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, home: Path):
        if shutil.which("bwrap") is None:
            pytest.skip("the fake Modal runs its containers in bubblewrap, which is not installed")
        self.home = home
        home.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.App, self.Image, self.Sandbox = (create_autospec(c) for c in (App, Image, Sandbox))
        self.app = create_autospec(App, instance=True)
        self.app.app_id = "ap-test"
        self.App.lookup.aio.return_value = self.app
        self.image = create_autospec(Image, instance=True)
        self.image.object_id = "im-base"
        self.Image.debian_slim.return_value = self.image
        self.image.apt_install.return_value = self.image
        self.Image.from_registry.return_value = self.Image.from_dockerfile.return_value = self.image
        self.Image.from_id.side_effect = self._image_from_id
        self.Sandbox.create.aio.side_effect = self._create
        self.sandboxes: list = []
        self.terminated: list[str] = []
        self.images: dict[str, Path] = {}
        self.containers: dict[str, Container] = {}
        for name in ("App", "Image", "Sandbox"):
            monkeypatch.setattr(modal, name, getattr(self, name))
        for key, value in {"MODAL_TOKEN_ID": "ak-test", "MODAL_TOKEN_SECRET": "as-test"}.items():
            monkeypatch.setenv(key, value)

    def sandbox(self, object_id: str, image: Path | None = None,
                network: api_pb2.NetworkAccess | None = None, workdir: str = "/") -> Sandbox:
        """An autospec of a running sandbox whose root file system starts as `image` (None: the base image)."""
        root = self.home / object_id
        if image is None:
            root.mkdir()
            _empty_root(root)
        else:
            subprocess.run(["cp", "-a", "--", str(image), str(root)], check=True)
        (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        box = Container(object_id, root, network or api_pb2.NetworkAccess(network_access_type=BLOCKED), workdir)
        self.containers[object_id] = box
        sandbox = create_autospec(Sandbox, instance=True)
        sandbox.object_id = object_id
        sandbox.filesystem = create_autospec(SandboxFilesystem, instance=True)
        _bind_aio(sandbox, Sandbox, "exec", "terminate", "get_tags", "snapshot_filesystem")
        _bind_aio(sandbox.filesystem, SandboxFilesystem, "copy_from_local")
        sandbox.filesystem.copy_from_local.aio.side_effect = partial(self._copy_from_local, box)
        sandbox.exec.aio.side_effect = partial(self._exec, box)
        sandbox.snapshot_filesystem.aio.side_effect = partial(self._snapshot, box)
        sandbox.terminate.aio.side_effect = partial(self._terminate, box)
        return sandbox

    def _image_from_id(self, image_id: str, client: object = None) -> Image:
        image = create_autospec(Image, instance=True)
        image.object_id = image_id  # loaded lazily, as Modal does: an unknown id fails at `create`
        return image

    async def _create(self, *args: str, app: object = None, image: Image | None = None, **kwargs: object) -> Sandbox:
        # The installed client's own checks, with what `create` was given.
        common = SandboxCreateCommon(SandboxCreateArgs(args=args, image=image, **{
            k: v for k, v in kwargs.items() if k in CREATE_ARGS}), secrets=[])
        network = common.network_access
        for domain in network.allowed_domains:
            if domain != "*" and not _DOMAIN_RE.match(domain):
                raise modal.exception.InvalidError(f"Invalid domain in outbound_domain_allowlist: {domain!r}")
        for cidr in network.allowed_cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise modal.exception.InvalidError(f"Invalid CIDR in outbound_cidr_allowlist: {cidr!r}") from None
        if image is self.image or image is None:
            source = None
        elif (source := self.images.get(image.object_id)) is None:
            raise modal.exception.NotFoundError(f"Image {image.object_id} not found")
        sandbox = self.sandbox(f"sb-{len(self.sandboxes)}", source, network, str(kwargs.get("workdir") or "/"))
        self.sandboxes.append(sandbox)
        return sandbox

    async def _exec(self, box: Container, *argv: str, env: dict[str, str | None] | None = None, text: bool = True,
                    workdir: str | None = None, **_: object) -> ContainerProcess:
        assert text is False, "the adapter reads bytes"
        box.check_running()
        if workdir is not None and not workdir.startswith("/"):
            raise modal.exception.InvalidError(f"workdir must be an absolute path, got: {workdir}")
        cwd = workdir or (box.workdir if (box.root / box.workdir.lstrip("/")).is_dir() else "/")
        given = {k: v for k, v in (env or {}).items() if v is not None}
        proc = await asyncio.create_subprocess_exec(
            *box.jail(cwd), *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": PATH, "HOME": "/root", **given}, start_new_session=True)
        box.processes.append(proc)
        return _process(proc)

    async def _copy_from_local(self, box: Container, local_path: str, remote_path: str) -> None:
        box.check_running()
        target = box.root / remote_path.lstrip("/")
        if not remote_path.startswith("/") or not target.parent.is_dir():
            raise modal.exception.SandboxFilesystemError(f"no such directory for {remote_path}")
        shutil.copyfile(local_path, target)

    async def _snapshot(self, box: Container, timeout: int = 55, *, ttl: int | None = None) -> Image:
        box.check_running()
        image_id = f"im-snap-{len(self.images)}"
        copy = await asyncio.create_subprocess_exec("cp", "-a", "--", str(box.root), str(self.home / image_id))
        assert await copy.wait() == 0
        self.images[image_id] = self.home / image_id
        image = create_autospec(Image, instance=True)
        image.object_id = image_id
        return image

    async def _terminate(self, box: Container, **_: object) -> None:
        box.terminated = True
        for proc in box.processes:  # the container ends, and everything in it
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self.terminated.append(box.object_id)

    def network(self, object_id: str) -> api_pb2.NetworkAccess:
        return self.containers[object_id].network
