"""A real PostgreSQL for the tests: one cluster per session, in a temporary folder, on a Unix socket only.

`postgres_url` is the cluster's superuser (`postgres`, who logs in without a password; every other role needs its
password), `database_url` a fresh database per test. Root may not run PostgreSQL: as root the cluster runs as the
`postgres` user (made by Debian's package) or `nobody`. Tests that use it are skipped only when PostgreSQL is not
installed (`./tb test` installs it).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_S = 60  # pg_ctl -w waits this long at most for the server to accept connections


def _bin() -> Path | None:
    """The folder of the newest PostgreSQL installed (Debian keeps each version's programs apart)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_user() -> tuple[list[str], str | None]:
    """The command prefix that runs a program as the cluster's owner, and that owner (None: this user)."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], user
    raise RuntimeError("running as root, and neither the postgres nor the nobody user exists to run PostgreSQL as")


NOT_INSTALLED = "PostgreSQL is not installed (no initdb): apt-get install postgresql, or run ./tb test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The base URL of a PostgreSQL cluster started for this session, and stopped at its end."""
    if _bin() is None:
        pytest.skip(NOT_INSTALLED)
    with cluster() as url:
        yield url


@contextmanager
def cluster() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder (its superuser's base URL), stopped and removed on exit; the
    benchmarks start theirs with it too."""
    bin_dir = _bin()
    if bin_dir is None:
        raise RuntimeError(NOT_INSTALLED)
    prefix, owner = _as_user()
    folder = Path(tempfile.mkdtemp(prefix="tb-pg-"))
    data = folder / "data"
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(folder, entry.pw_uid, entry.pw_gid)

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], cwd=folder, capture_output=True, text=True, timeout=START_S + 30)
        if done.returncode != 0:
            log = folder / "log"
            raise RuntimeError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}"
                               + (log.read_text() if log.exists() else ""))

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync",
            "--auth-local=trust")
        (data / "pg_hba.conf").write_text("local all postgres trust\nlocal all all scram-sha-256\n")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{folder}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", str(START_S), "start")
    except BaseException:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], cwd=folder,
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield f"postgresql://postgres@/postgres?host={folder}"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                        "stop"], cwd=folder, capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def psql(base_url: str, sql: str) -> str:
    """Run SQL on the cluster as its superuser; its output, unaligned."""
    bin_dir = _bin()
    assert bin_dir is not None
    done = subprocess.run([str(bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", base_url,
                           "-c", sql], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"psql failed on {sql!r}: {done.stderr}")
    return done.stdout.strip()


def new_database(base_url: str) -> str:
    """The URL of a new, empty database on the cluster at `base_url`."""
    name = f"t_{secrets.token_hex(6)}"
    psql(base_url, f"CREATE DATABASE {name}")
    return base_url.replace("@/postgres?", f"@/{name}?")


@pytest.fixture
def database_url(postgres_url: str) -> Iterator[str]:
    """The URL of a database made for this test alone (dropped after it)."""
    url = new_database(postgres_url)
    yield url
    psql(postgres_url, f"DROP DATABASE IF EXISTS {url.split('@/')[1].split('?')[0]} WITH (FORCE)")
