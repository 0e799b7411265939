"""`python -m bench`: run every benchmark; the exit status is 1 when a target was missed."""

import asyncio
import sys

from . import orchestrator, sandbox
from .sandbox import Result


async def run_all() -> list[Result]:
    return [*await sandbox.main(), *await orchestrator.main()]


def main() -> None:
    results = asyncio.run(run_all())
    missed = [r.label for r in results if not r.ok]
    print(f"\n{len(results) - len(missed)} of {len(results)} targets met"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
