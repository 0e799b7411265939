"""An unsafe backend with no isolation: commands run as plain processes in the repository directory.

For machines without bubblewrap only, and only when the operator says so with SANDBOX_ALLOW_UNSAFE=1. Limits and
the clean environment still apply; the network, the host's files and a detached (setsid) process are not contained.
"""

from __future__ import annotations

import shutil

from .base import BackendUnavailable, SandboxError
from .host import SANDBOX_ENV, HostSandbox, SetupMounts


class ProcessSandbox(HostSandbox):
    backend = "process"

    @staticmethod
    def check(allow_unsafe: bool) -> None:
        if not allow_unsafe:
            raise BackendUnavailable(
                "the process backend runs commands without isolation and is refused unless SANDBOX_ALLOW_UNSAFE=1; "
                "install bubblewrap (apt-get install bubblewrap) and use SANDBOX_BACKEND=local instead"
            )

    @staticmethod
    def workdir_for(repo) -> str:
        return str(repo)

    @property
    def env(self) -> dict[str, str]:
        scratch = str(self.home / "tmp")
        return SANDBOX_ENV | {"HOME": scratch, "TMPDIR": scratch}

    def jail_argv(self, script_fd: int, cwd: str, read_only: bool = False, setup: SetupMounts | None = None
                  ) -> tuple[list[str], str | None]:
        if setup is not None:
            raise SandboxError("setup needs the bubblewrap backend (SANDBOX_BACKEND=local): this backend cannot "
                               "give a setup its own /env and network; commands run without an environment")
        if read_only:
            raise SandboxError("read-only commands need the bubblewrap backend (SANDBOX_BACKEND=local)")
        return [shutil.which("bash") or "/bin/bash", f"/dev/fd/{script_fd}"], str(self.repo / cwd)
