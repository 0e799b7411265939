"""`./tb demo` (`python -m orchestrator.demo`): a planner, a coder and a reviewer fix a bug in a sample repository made
on the spot, through the real service, sandbox and local forge, the model's turns replayed from the bundled
trajectory (TB_MODEL=replay:…): no API key, no network. It prints where the pull request is and stops the service;
with --keep the service stays up for the page until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

TRAJECTORY = Path(__file__).with_name("trajectory.json")
PROMPT = "add() subtracts instead of adding: fix it, and make sure the tests pass."
SAMPLE = {
    "README.md": "# calc\n\nA tiny module for the Tiny Backspace demo. Its tests: `python3 -m unittest -v`.\n",
    "calc.py": '"""Arithmetic for the demo."""\n\n\ndef add(a, b):\n    """The sum of a and b."""\n    return a - b\n',
    "test_calc.py": "import unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n"
                    "    def test_adds(self):\n        self.assertEqual(add(2, 3), 5)\n\n\n"
                    'if __name__ == "__main__":\n    unittest.main()\n',
}
# The sample's own git: none of the user's configuration (identity, hooks, signing) is needed or used.
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Tiny Backspace demo",
           "GIT_AUTHOR_EMAIL": "demo@example.invalid", "GIT_COMMITTER_NAME": "Tiny Backspace demo",
           "GIT_COMMITTER_EMAIL": "demo@example.invalid"}
READY_S = 90  # the service listens once its MCP servers are up, which it waits 60 s for at most
STOP_S = 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's options."""
    parser = argparse.ArgumentParser(prog="./tb demo", description="Fix a bug in a sample repository through the "
                                     "real service, replaying a recorded run: no API key, no network.")
    parser.add_argument("--dir", type=Path, help="where to make the sample repository (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the service running for the page until Ctrl-C")
    parser.add_argument("--port", type=int, default=0, help="the service's port (default: a free one)")
    return parser.parse_args(argv)


def git(repo: Path, *args: str) -> str:
    """Run git on the sample repository; its output."""
    done = subprocess.run(["git", "-C", str(repo), *args], env=os.environ | GIT_ENV, check=True, capture_output=True,
                          text=True)
    return done.stdout


def make_sample(repo: Path) -> Path:
    """A git repository on `main` whose test fails: add() subtracts."""
    repo.mkdir(parents=True)
    for name, text in SAMPLE.items():
        (repo / name).write_text(text)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "calc: add()")
    return repo


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python -m orchestrator` in a process of its own, as `./tb serve` starts it; its output goes to a log file."""

    def __init__(self, port: int, env: dict[str, str], log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "--host", "127.0.0.1", "--port",
                                      str(port)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.listening = False
        self.settled = threading.Event()  # it listens, or it ended
        threading.Thread(target=self._copy, args=(self.proc.stdout,), daemon=True).start()

    def _copy(self, output: TextIO) -> None:
        with self.log.open("w") as log:
            for line in output:
                log.write(line)
                log.flush()
                if "listening on http://" in line:
                    self.listening = True
                    self.settled.set()
        self.settled.set()

    def wait_ready(self) -> str | None:
        """None once the service listens, else why it does not."""
        if not self.settled.wait(READY_S):
            return f"it did not listen within {READY_S} s"
        if self.listening:
            return None
        lines = self.log.read_text().strip().splitlines()  # a service that cannot start says why in its last line
        return lines[-1].removeprefix("error: ") if lines else f"it exited with code {self.proc.wait()}"

    def latest_run(self) -> dict:
        """The record of the service's latest run (the demo's store holds the demo's runs only)."""
        with urllib.request.urlopen(f"{self.url}/runs?limit=1", timeout=10) as resp:
            return json.load(resp)["runs"][0]

    def stop(self) -> None:
        """Stop it as Ctrl-C would, and wait (bounded) until it has."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Make the sample, start the service, run the job through the command line client, say where to look."""
    args = parse_args(argv)
    base = (args.dir or Path(tempfile.mkdtemp(prefix="tb-demo-"))).absolute()
    try:
        repo = make_sample(base / "calc")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"error: cannot make the sample repository in {base}: {exc}; pass --dir with an empty folder",
              file=sys.stderr)
        return 2
    # Its own store: a service already running keeps its runs, and none of them is taken for interrupted.
    env = {k: v for k, v in os.environ.items() if k not in ("TB_API_TOKEN", "TB_SERVICE_URL")}
    env |= {"TB_MODEL": f"replay:{TRAJECTORY}", "TB_DATA_DIR": str(base / "data")}
    service = Service(args.port or free_port(), env, base / "service.log")
    try:
        if problem := service.wait_ready():
            print(f"error: the demo's service did not start: {problem} (its log: {service.log})", file=sys.stderr)
            return 2
        print(f"The demo: a recorded team run ({TRAJECTORY.name}) replayed through the service at {service.url}, "
              f"with no API key and no network, on a sample repository: {repo}\n", flush=True)
        client = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--service", service.url, "--mode",
                                 "team", "--repo", str(repo), PROMPT], env=env)
        run = service.latest_run()
        if client.returncode != 0 or not run.get("pull_request_url"):
            print(f"\nerror: the demo's run {run['id']} opened no pull request (above: why; the service's log: "
                  f"{service.log})", file=sys.stderr)
            return 1
        report(run, repo, base, service.url, args.keep)
        if args.keep:
            try:
                service.proc.wait()
            except KeyboardInterrupt:  # the way out we named: the service got it too, and stops
                pass
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        service.stop()


def report(run: dict, repo: Path, base: Path, url: str, keep: bool) -> None:
    """Where to look: the run, its pull request, the branch and its diff, the page."""
    record = Path(unquote(urlsplit(run["pull_request_url"]).path))
    head = json.loads(record.read_text())["head"]
    print(f"\nWhere to look:\n"
          f"  run:           {run['id']} ({run['status']})\n"
          f"  pull request:  {record}\n"
          f"  branch:        {head} (main is untouched)\n"
          f"  its commit:    git -C {repo} log -p main..{head}\n"
          f"  the diff (git -C {repo} diff main...{head}):")
    for line in git(repo, "diff", f"main...{head}").splitlines():
        print(f"    {line}")
    page = f"{url}/#{run['id']}"
    if keep:
        print(f"\n  the page:      {page} (the service runs until Ctrl-C)", flush=True)
    else:
        print(f"\n  the page:      the service has stopped; to see this run there, run ./tb demo --keep, or\n"
              f"                 TB_DATA_DIR={base / 'data'} ./tb serve and open http://127.0.0.1:8002/#{run['id']}")


if __name__ == "__main__":
    sys.exit(main())
