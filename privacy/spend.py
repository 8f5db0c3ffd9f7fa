"""The region's side of every round: may it spend, how much, and the ledger entry that records it.

Order in a round: plan (decline if the projected cumulative ε would pass the budget) → train →
`record` (ledger entry fsync'd) → only then may the update leave the region.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.privacy.accountant import noise_for_budget, opacus_epsilon
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.dp_sgd import DPPlan, round_shape
from fedrec.privacy.ledger import LEDGER_FILE, Ledger, LedgerEntry


def segments(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    """The (σ, q, steps) history an accountant composes, read from ledger entries."""
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


@dataclass(frozen=True)
class SpendDecision:
    allowed: bool
    plan: DPPlan | None
    spent_epsilon: float            # cumulative ε before this round
    projected_epsilon: float        # cumulative ε after it, if it runs
    reason: str = ""


class RegionPrivacy:
    """A region's budget and ledger; the ledger alone decides what has been spent."""

    def __init__(self, region: str, budget: RegionBudget, state_dir: str | Path):
        self.region, self.budget = region, budget
        self.ledger = Ledger(Path(state_dir) / LEDGER_FILE)

    def exclusive(self, timeout: float | None = None):
        """Hold across plan → train → record: a second round arriving meanwhile (a late one and
        the next, or two processes) waits, so no two plans are made on the same history. It waits
        `timeout` seconds at most, then fails without spending."""
        return self.ledger.lock(timeout)

    def spent(self) -> float:
        return opacus_epsilon(segments(self.ledger.entries()), self.budget.delta, self.budget.accountant)

    def plan_round(self, users: int, batch_size: int, local_epochs: float, planned_rounds: int) -> SpendDecision:
        """σ is fixed once for the whole run (given, or derived from the budget for the planned
        rounds at the first spend) and then read back from the ledger."""
        self.budget.validate(users)
        entries = self.ledger.entries()
        history = segments(entries)
        spent = opacus_epsilon(history, self.budget.delta, self.budget.accountant)
        sample_rate, steps = round_shape(users, batch_size, local_epochs)
        if self.budget.noise_multiplier > 0:
            sigma = self.budget.noise_multiplier
        elif entries:
            sigma = entries[-1].noise_multiplier
        else:
            sigma = noise_for_budget(self.budget.epsilon, self.budget.delta, sample_rate,
                                     steps * max(planned_rounds, 1), self.budget.accountant)
        projected = opacus_epsilon(history + [(sigma, sample_rate, steps)], self.budget.delta,
                                   self.budget.accountant)
        plan = DPPlan(users, sample_rate, steps, sigma, self.budget.max_grad_norm)
        if projected > self.budget.epsilon:
            return SpendDecision(False, plan, spent, projected,
                                 f"region {self.region} declines: this round would bring its ε from "
                                 f"{spent:.3f} to {projected:.3f}, over its budget {self.budget.epsilon:g}")
        return SpendDecision(True, plan, spent, projected)

    def record(self, decision: SpendDecision, run: str, server_round: int) -> LedgerEntry:
        """Append and fsync the spend; call before the update leaves the region."""
        if not decision.allowed or decision.plan is None:
            raise FedrecError("cannot record a round the budget declined")
        plan = decision.plan
        return self.ledger.append(
            region=self.region, run=run, round=server_round, steps=plan.steps,
            sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, users=plan.users, delta=self.budget.delta,
            epsilon=decision.projected_epsilon, budget_epsilon=self.budget.epsilon,
            accountant=self.budget.accountant, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
