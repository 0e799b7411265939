"""What a run may spend, shared by its agents: wall-clock time, tokens, and money at list prices, for the run and for
each role; `LimitReached` names the bound that stopped it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .config import RunLimits
from .model import Usage, prices

WARN_SHARE = 0.8  # of a money limit: warned of once, in a `budget` event


class LimitReached(Exception):
    """A bound of the run was hit; `limit` names it."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


@dataclass
class Budget:
    """What a whole run may spend, shared by its agents: time, tokens, and money at list prices, for the run and
    for each role."""

    max_tokens: int
    deadline: float  # time.monotonic() value
    max_cost_usd: float | None = None
    role_max_cost_usd: dict[str, float] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    by_role: dict[str, Usage] = field(default_factory=dict)
    role_cost_usd: dict[str, float] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)  # the scopes whose warning was given

    @classmethod
    def of(cls, limits: RunLimits) -> Budget:
        """A run's budget, from now."""
        return cls(limits.max_tokens, time.monotonic() + limits.run_seconds, limits.max_cost_usd,
                   limits.role_max_cost_usd)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, role: str | None = None, model: str = "", input_tokens: int = 0) -> list[dict[str, Any]]:
        """Raise `LimitReached` when a bound is reached, or would be by a call of `model` sending `input_tokens`
        (at the uncached price); the money limits that call would take past 80 % for the first time."""
        if self.remaining_s() <= 0:
            raise LimitReached("run_seconds", "the run's wall-clock limit was reached (TB_RUN_TIMEOUT_S)")
        if self.usage.total >= self.max_tokens:
            raise LimitReached("tokens", f"the run used {self.usage.total} tokens, its limit (TB_MAX_TOKENS)")
        upcoming = input_tokens * prices(model)[0] / 1e6
        scopes = [("run", self.cost_usd, self.max_cost_usd, "TB_MAX_COST_USD")]
        if role is not None:
            scopes.append((role, self.role_cost_usd.get(role, 0.0), self.role_max_cost_usd.get(role),
                           f"TB_{role.upper()}_MAX_COST_USD"))
        warnings = []
        for scope, spent, limit, setting in scopes:
            if limit is None:
                continue
            if spent + upcoming >= limit:
                who = "the run" if scope == "run" else f"the {scope}"
                raise LimitReached("cost", f"{who} spent ${spent:.2f} and its next model call would take it to its "
                                           f"limit of ${limit:.2f} ({setting})")
            if spent + upcoming >= WARN_SHARE * limit and scope not in self.warned:
                self.warned.add(scope)
                warnings.append({"scope": scope, "spent_usd": round(spent + upcoming, 6), "limit_usd": limit,
                                 "share": round((spent + upcoming) / limit, 3)})
        return warnings

    def charge(self, usage: Usage, model: str, role: str) -> None:
        """Count a model call of `role`, at its own model's price."""
        cost = usage.cost_usd(model)
        self.usage.add(usage)
        self.cost_usd += cost
        self.by_role.setdefault(role, Usage()).add(usage)
        self.role_cost_usd[role] = self.role_cost_usd.get(role, 0.0) + cost

    def report(self) -> dict[str, Any]:
        """The tokens and cost so far, in all and by role."""
        return {**self.usage.as_dict(), "cost_usd": round(self.cost_usd, 6),
                "by_role": {role: {**usage.as_dict(), "cost_usd": round(self.role_cost_usd.get(role, 0.0), 6)}
                            for role, usage in self.by_role.items()}}
