"""`python -m bench [sandbox|egress|orchestrator|load|environment|context|attempts ...]`: run every benchmark, or
the named ones; the exit status is 1 when a target was missed."""

import asyncio
import sys

from . import attempts, context, egress, environment, load, orchestrator, sandbox
from .sandbox import Result

BENCHMARKS = {"sandbox": sandbox.main, "egress": egress.main, "orchestrator": orchestrator.main,
              "load": load.main, "environment": environment.main, "context": context.main,
              "attempts": attempts.main}


async def run_all(names: list[str]) -> list[Result]:
    results: list[Result] = []
    for name in names:
        results += await BENCHMARKS[name]()
    return results


def main() -> None:
    names = sys.argv[1:] or list(BENCHMARKS)
    if unknown := [n for n in names if n not in BENCHMARKS]:
        sys.exit(f"no benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    results = asyncio.run(run_all(names))
    missed = [r.label for r in results if not r.ok]
    print(f"\n{len(results) - len(missed)} of {len(results)} targets met"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
