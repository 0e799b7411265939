"""One control group per sandbox: a budget of processes, memory and CPU that all its processes share, however many
commands run at once, and a way to kill all of them.

cgroup v1 (a hierarchy per controller) and v2 (one unified hierarchy) both work; `Hierarchy.detect` finds which one
this server can write. Where it can write neither (a server that is not root, a container that delegates nothing),
it says why and the limits stay per command (rlimits), as the README's threat model states.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from common.settings import at_least, between, setting

CONTROLLERS = ("pids", "memory", "cpu")
GROUP = "tiny-backspace"
TCP_BYTES = 64 * 1024 * 1024
# Joins the groups named by its first arguments, then becomes the command that follows them: the command and all it
# starts are in the sandbox's budget from their first instruction, with no window for a fork outside it.
JOIN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'


@dataclass(frozen=True)
class Budget:
    """What one sandbox may use, all its processes together."""

    pids: int = setting("SANDBOX_PIDS_MAX", 512, check=at_least(16))
    memory_mib: int = setting("SANDBOX_MEMORY_MIB", 4096, check=at_least(64))
    # Relative to other sandboxes and to the server (100 is the kernel's default).
    cpu_weight: int = setting("SANDBOX_CPU_WEIGHT", 100, check=between(1, 10000))


def _mounts() -> dict[str, Path]:
    """Mount points of cgroup hierarchies: v1 by controller, v2 under the key 'unified'."""
    found: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split()[:3]
            point = Path(left.split()[4].replace("\\040", " "))
            if fstype == "cgroup2":
                found.setdefault("unified", point)
            elif fstype == "cgroup":
                for opt in options.split(","):
                    if opt in CONTROLLERS:
                        found.setdefault(opt, point)
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path in each hierarchy (v1 by controller, v2 as 'unified')."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else ["unified"]:
                paths[name] = path
    return paths


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Hierarchy:
    """Where this server makes its sandboxes' groups: a parent folder per controller (v1), or one (v2)."""

    version: int
    parents: dict[str, Path]

    @classmethod
    def detect(cls) -> Hierarchy | str:
        """The hierarchy to use, or why there is none."""
        if os.geteuid() != 0:
            return "the sandbox server does not run as root, so it cannot create control groups"
        try:
            mounts, own = _mounts(), _own_paths()
        except OSError as exc:
            return f"cannot read this process's control groups ({exc.strerror})"
        try:
            if all(c in mounts for c in CONTROLLERS):
                parents = {c: mounts[c] / own.get(c, "/").lstrip("/") / GROUP for c in CONTROLLERS}
                for parent in parents.values():
                    parent.mkdir(exist_ok=True)
                return cls(1, parents)
            if "unified" in mounts:
                return cls(2, {"unified": _delegate_v2(mounts["unified"] / own.get("unified", "/").lstrip("/"))})
        except OSError as exc:
            return f"cannot create control groups ({exc.strerror}: {exc.filename})"
        return "no cgroup v1 pids, memory and cpu controllers, and no cgroup v2 hierarchy, are mounted"

    def create(self, name: str, budget: Budget) -> Cgroup:
        """A new group `name` with `budget`; removed again if any limit cannot be set."""
        dirs = {c: parent / name for c, parent in self.parents.items()}
        group = Cgroup(self.version, dirs)
        try:
            for folder in dirs.values():
                folder.mkdir()
            memory = str(budget.memory_mib * 1024 * 1024)
            if self.version == 1:
                _write(dirs["pids"] / "pids.max", str(budget.pids))
                _write(dirs["memory"] / "memory.limit_in_bytes", memory)
                if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():  # no swap beyond the memory budget
                    _write(dirs["memory"] / "memory.memsw.limit_in_bytes", memory)
                _write(dirs["cpu"] / "cpu.shares", str(max(2, budget.cpu_weight * 1024 // 100)))
                # v1 leaves socket buffers out of the memory budget unless asked: a jail's own loopback could queue
                # gigabytes of the host's memory in TCP buffers.
                if (dirs["memory"] / "memory.kmem.tcp.limit_in_bytes").exists():
                    _write(dirs["memory"] / "memory.kmem.tcp.limit_in_bytes", str(min(TCP_BYTES, int(memory))))
            else:
                folder = dirs["unified"]
                _write(folder / "pids.max", str(budget.pids))
                _write(folder / "memory.max", memory)
                if (folder / "memory.swap.max").exists():
                    _write(folder / "memory.swap.max", "0")
                _write(folder / "cpu.weight", str(budget.cpu_weight))
        except OSError:
            group.remove()
            raise
        return group

    def stale(self, prefix: str) -> list[Cgroup]:
        """The groups whose names start with `prefix` (a server that is gone made them)."""
        first = next(iter(self.parents.values()))
        names = [p.name for p in first.iterdir() if p.is_dir() and p.name.startswith(prefix)]
        return [Cgroup(self.version, {c: parent / n for c, parent in self.parents.items()}) for n in names]


def _delegate_v2(own: Path) -> Path:
    """A parent under our own v2 group with pids, memory and cpu enabled for its children.

    v2 lets only a group without processes hand controllers down, so the server moves itself into a leaf first.
    """
    parent = own / GROUP
    wanted = "+pids +memory +cpu"
    try:
        _write(own / "cgroup.subtree_control", wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = own / "server"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(own / "cgroup.subtree_control", wanted)
    parent.mkdir(exist_ok=True)
    _write(parent / "cgroup.subtree_control", wanted)
    return parent


@dataclass
class Cgroup:
    """One sandbox's group, in every hierarchy it spans."""

    version: int
    dirs: dict[str, Path]

    def join_argv(self) -> list[str]:
        """An argv prefix that puts the command after it into this group before it runs."""
        procs = [str(d / "cgroup.procs") for d in self.dirs.values()]
        return ["/bin/sh", "-c", JOIN, "tb-join", str(len(procs)), *procs]

    def pids(self) -> list[int]:
        folder = self.dirs["pids" if self.version == 1 else "unified"]
        try:
            return [int(p) for p in (folder / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill(self) -> int:
        """SIGKILL every process in the group; how many there were."""
        if self.version == 2 and (self.dirs["unified"] / "cgroup.kill").exists():
            found = self.pids()
            if found:
                _write(self.dirs["unified"] / "cgroup.kill", "1")
            return len(found)
        found = self.pids()
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(found)

    async def destroy(self, within: float = 10) -> None:
        """Kill everything in the group, wait until it is empty, and remove it."""
        async with asyncio.timeout(within):
            while self.kill():
                await asyncio.sleep(0.01)  # a killed process leaves its group once the kernel has reaped it
        self.remove()

    def remove(self) -> None:
        for folder in self.dirs.values():
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass

    def memory_peak(self) -> int | None:
        """The most memory the group has used, in bytes (None where the kernel does not say)."""
        name = ("memory", "memory.max_usage_in_bytes") if self.version == 1 else ("unified", "memory.peak")
        try:
            return int((self.dirs[name[0]] / name[1]).read_text())
        except (OSError, ValueError):
            return None
