"""The local backend: each command runs in a bubblewrap jail with no network and nothing of the host but /usr and
/etc."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .base import BackendUnavailable
from .environment import ENV_DIR
from .host import SANDBOX_ENV, HostSandbox, SetupMounts

WORKDIR = "/workspace"
TMPFS_BYTES = str(1024**3)  # each scratch tmpfs; memory-backed, so bounded (and charged to the sandbox's cgroup)
SHM_BYTES = str(256 * 1024**2)
SOURCE = "/run/tb-source"  # the repository, read-only, in a setup's jail
EGRESS_SOCKET = "/run/tb-egress.sock"


def _system_binds() -> list[str]:
    """Read-only /usr and /etc, and /bin, /lib… as links or binds, whichever this host has."""
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _is_dir(path: Path) -> bool:
    """A directory itself, never through a link: the environment's content is the sandbox's to choose."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class BwrapSandbox(HostSandbox):
    backend = "local"

    @staticmethod
    def workdir_for(repo) -> str:
        return WORKDIR

    @staticmethod
    def check(allow_unsafe: bool) -> None:
        if shutil.which("bwrap") is None:
            raise BackendUnavailable(
                "bubblewrap is not installed: apt-get install bubblewrap, or set SANDBOX_BACKEND=process "
                "together with SANDBOX_ALLOW_UNSAFE=1 to run commands without isolation"
            )

    def jail_argv(self, script_fd: int, cwd: str, read_only: bool = False, setup: SetupMounts | None = None
                  ) -> tuple[list[str], str | None]:
        inside = WORKDIR if cwd == "." else f"{WORKDIR}/{cwd}"
        if setup is not None:
            # A setup works in a throwaway copy of the repository (its script copies SOURCE into this tmpfs):
            # whatever it writes there is gone with it, so the environment is all it leaves, and a cached one
            # fits every later clone.
            workspace = ["--ro-bind", str(self.repo), SOURCE, "--size", TMPFS_BYTES, "--tmpfs", WORKDIR,
                         "--bind", str(setup.env_dir), ENV_DIR]
            if setup.egress_socket is not None:
                workspace += ["--bind", str(setup.egress_socket), EGRESS_SOCKET]
        else:
            workspace = ["--ro-bind" if read_only else "--bind", str(self.repo), WORKDIR]
            if self.environment is not None:
                workspace += ["--ro-bind", str(self.environment), ENV_DIR]
                if _is_dir(self.environment / "node_modules"):
                    # On the resolution path of everything under /workspace, and npm run puts its .bin on PATH.
                    workspace += ["--symlink", f"{ENV_DIR}/node_modules", "/node_modules"]
        bwrap = [
            shutil.which("bwrap") or "bwrap",
            *_system_binds(),
            # /dev is a tmpfs of half the host's memory that bubblewrap cannot size: read-only, but a sized /dev/shm.
            "--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--size", SHM_BYTES, "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev",
            "--size", TMPFS_BYTES, "--tmpfs", "/tmp", "--size", TMPFS_BYTES, "--tmpfs", "/var/tmp",
            "--size", "1048576", "--tmpfs", "/run",
            *workspace,  # after /run, which holds a setup's mounts
            "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "1000", "--gid", "1000",
            "--hostname", "sandbox",
            "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "HOME", "/tmp", "--setenv", "USER", "sandbox",
        ]
        for key, value in SANDBOX_ENV.items():
            bwrap += ["--setenv", key, value]
        bwrap += ["--chdir", inside, "--", "bash", f"/dev/fd/{script_fd}"]
        return bwrap, None
