"""A Modal that runs here: autospecs of the installed `modal` classes whose sandboxes execute on this machine.

Every call the adapter makes goes through `create_autospec`, so a parameter name or call shape the installed `modal`
does not accept fails the test. What the adapter sends into the container (the exec wrapper, the file-tool runner,
git, tar) really runs, in a directory that stands in for the container's /workspace.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from unittest.mock import create_autospec

import modal
import pytest
from modal.container_process import ContainerProcess
from modal.io_streams import StreamReader, StreamWriter
from modal.sandbox.sandbox import SandboxFilesystem

from servers.sandbox import modal_backend

# The real classes, kept before a test replaces them in the `modal` module.
App, Image, Sandbox = modal.App, modal.Image, modal.Sandbox


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


class LocalModal:
    """The `modal` module's App, Image and Sandbox replaced by autospecs; `sandboxes` holds those created."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, container: Path):
        self.container = container
        self.App, self.Image, self.Sandbox = (create_autospec(c) for c in (App, Image, Sandbox))
        self.app = create_autospec(App, instance=True)
        self.app.app_id = "ap-test"
        self.App.lookup.aio.return_value = self.app
        self.image = create_autospec(Image, instance=True)
        self.Image.debian_slim.return_value = self.image
        self.image.apt_install.return_value = self.image
        self.Sandbox.create.aio.side_effect = self._create
        self.sandboxes: list = []
        self.terminated: list[str] = []
        for name in ("App", "Image", "Sandbox"):
            monkeypatch.setattr(modal, name, getattr(self, name))
        monkeypatch.setattr(modal_backend, "WORKDIR", str(container))
        for key, value in {"MODAL_TOKEN_ID": "ak-test", "MODAL_TOKEN_SECRET": "as-test"}.items():
            monkeypatch.setenv(key, value)

    def sandbox(self, object_id: str) -> Sandbox:
        """An autospec of a running sandbox whose exec runs here."""
        sandbox = create_autospec(Sandbox, instance=True)
        sandbox.object_id = object_id
        sandbox.filesystem = create_autospec(SandboxFilesystem, instance=True)
        _bind_aio(sandbox, Sandbox, "exec", "terminate", "get_tags")
        _bind_aio(sandbox.filesystem, SandboxFilesystem, "copy_from_local")
        sandbox.filesystem.copy_from_local.aio.side_effect = lambda local, remote: shutil.copyfile(local, remote)
        sandbox.exec.aio.side_effect = self._exec
        sandbox.terminate.aio.side_effect = lambda **_: self.terminated.append(object_id)
        return sandbox

    async def _create(self, *args: str, **kwargs: object) -> Sandbox:
        sandbox = self.sandbox(f"sb-{len(self.sandboxes)}")
        self.sandboxes.append(sandbox)
        return sandbox

    async def _exec(self, *argv: str, env: dict[str, str] | None = None, text: bool = True,
                    **_: object) -> ContainerProcess:
        assert text is False, "the adapter reads bytes"
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ["PATH"], **(env or {})})
        return _process(proc)
