"""The region's side of every round: may it spend, how much, and the ledger entry that records it.

Order in a round: plan (decline if the projected cumulative ε would pass the budget) → train →
record (ledger entry signed and fsync'd) → only then may the update leave the region.
`RegionPrivacy.round` is that order as one block: the lock held throughout, the entry written
when the block ends cleanly, and the claim an update travels with readable only after it.

The ledger belongs to the region's data, not to a run: every run on the same users (federated,
simulated or local) composes into it, and the budget is the data's lifetime budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.privacy.accountant import noise_for_budget, opacus_epsilon
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.claims import PrivacyClaim
from fedrec.privacy.ledger import LEDGER_FILE, Ledger, LedgerEntry
from fedrec.privacy.plan import DPPlan, round_shape
from fedrec.privacy.signing import SigningKey

# A run whose derived σ puts more noise than one clipped gradient on each averaged step would
# send updates that are noise: the region declines instead of spending its last ε on them.
MAX_NOISE_PER_STEP = 1.0


def segments(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    """The (σ, q, steps) history an accountant composes, read from ledger entries."""
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


@dataclass(frozen=True)
class SpendDecision:
    allowed: bool
    plan: DPPlan | None
    spent_epsilon: float            # cumulative ε before this round
    projected_epsilon: float        # cumulative ε after it, if it runs
    run: str
    reason: str = ""


@dataclass
class RoundSpend:
    """One round's spend inside `RegionPrivacy.round`: what was decided, and once the block has
    ended cleanly, the entry that records it."""

    decision: SpendDecision
    entry: LedgerEntry | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def plan(self) -> DPPlan:
        if self.decision.plan is None or not self.allowed:
            raise FedrecError(f"this round was declined: {self.decision.reason}")
        return self.decision.plan

    def claim(self) -> PrivacyClaim:
        """What the update carries; there is none before the entry is on disk."""
        if self.entry is None:
            raise FedrecError("the spend is recorded when the round's block ends: release the update after it")
        return PrivacyClaim.of_entry(self.entry)


class RegionPrivacy:
    """A region's budget and ledger; the ledger alone decides what has been spent."""

    def __init__(self, region: str, budget: RegionBudget, state_dir: str | Path):
        self.region, self.budget, self.state_dir = region, budget, Path(state_dir)
        self.ledger = Ledger(self.state_dir / LEDGER_FILE)

    def exclusive(self, timeout: float | None = None):
        """Hold across plan → train → record: a second round arriving meanwhile (a late one and
        the next, or two processes) waits, so no two plans are made on the same history. It waits
        `timeout` seconds at most, then fails without spending."""
        return self.ledger.lock(timeout)

    def spent(self) -> float:
        return opacus_epsilon(segments(self.ledger.entries()), self.budget.delta, self.budget.accountant)

    def plan_round(self, users: int, batch_size: int, local_epochs: float, planned_rounds: int,
                   run: str) -> SpendDecision:
        """σ is fixed once per run: given, or at the run's first spend the smallest σ that fits
        the run's planned rounds into what is left of the lifetime budget; later rounds of the
        run read it back from the ledger."""
        self.budget.validate(users)
        entries = self.ledger.entries()
        history = segments(entries)
        spent = opacus_epsilon(history, self.budget.delta, self.budget.accountant)
        sample_rate, steps = round_shape(users, batch_size, local_epochs)
        this_run = [e for e in entries if e.run == run]
        if spent >= self.budget.epsilon:
            return SpendDecision(False, None, spent, spent, run, f"region {self.region} declines: its lifetime ε "
                                 f"{spent:.3f} has reached its budget {self.budget.epsilon:g}")
        if self.budget.noise_multiplier > 0:
            sigma = self.budget.noise_multiplier
        elif this_run:
            sigma = this_run[-1].noise_multiplier
        else:
            try:
                sigma = noise_for_budget(self.budget.epsilon, self.budget.delta, sample_rate,
                                         steps * max(planned_rounds, 1), self.budget.accountant, history)
            except FedrecError as exc:
                return SpendDecision(False, None, spent, spent, run, f"region {self.region} declines: {exc}")
            if sigma / (sample_rate * users) > MAX_NOISE_PER_STEP:
                return SpendDecision(False, None, spent, spent, run, (
                    f"region {self.region} declines: what is left of its lifetime budget ({spent:.3f} of "
                    f"{self.budget.epsilon:g} spent) would need σ = {sigma:.1f} for {planned_rounds} rounds, "
                    f"noise of {sigma / (sample_rate * users):.1f}·C on each averaged step: its updates would be noise"))
        projected = opacus_epsilon(history + [(sigma, sample_rate, steps)], self.budget.delta,
                                   self.budget.accountant)
        plan = DPPlan(users, sample_rate, steps, sigma, self.budget.max_grad_norm)
        if projected > self.budget.epsilon:
            return SpendDecision(False, plan, spent, projected, run,
                                 f"region {self.region} declines: this round would bring its ε from "
                                 f"{spent:.3f} to {projected:.3f}, over its budget {self.budget.epsilon:g}")
        return SpendDecision(True, plan, spent, projected, run)

    @contextmanager
    def round(self, users: int, batch_size: int, local_epochs: float, planned_rounds: int, run: str,
              server_round: int, timeout: float | None = None) -> Iterator[RoundSpend]:
        """The privacy protocol of one round: hold the ledger's lock, plan, let the caller train
        on `spend.plan` (unless `spend.allowed` is false), and when the block ends cleanly record
        the spend, signed and fsync'd, before `spend.claim()` can be read. A block that raises
        records nothing: it released nothing."""
        with self.exclusive(timeout):
            spend = RoundSpend(self.plan_round(users, batch_size, local_epochs, planned_rounds, run))
            yield spend
            if spend.allowed:
                spend.entry = self.record(spend.decision, server_round)

    def record(self, decision: SpendDecision, server_round: int) -> LedgerEntry:
        """Append, sign and fsync the spend; call before the update leaves the region."""
        if not decision.allowed or decision.plan is None:
            raise FedrecError("cannot record a round the budget declined")
        plan = decision.plan
        return self.ledger.append(
            SigningKey.load_or_create(self.state_dir),
            region=self.region, run=decision.run, round=server_round, steps=plan.steps,
            sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, users=plan.users, delta=self.budget.delta,
            epsilon=decision.projected_epsilon, budget_epsilon=self.budget.epsilon,
            accountant=self.budget.accountant, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


@dataclass(frozen=True)
class RunSpend:
    """What one run spent of a region's lifetime budget."""

    run: str
    entries: int
    rounds: list[int]
    epsilon_alone: float        # the run's events composed on their own
    epsilon_after: float        # the region's cumulative ε at the run's last entry


def spend_by_run(entries: list[LedgerEntry]) -> list[RunSpend]:
    """Per run, in order of first spend."""
    runs: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        runs.setdefault(entry.run, []).append(entry)
    return [RunSpend(run, len(mine), [e.round for e in mine],
                     opacus_epsilon(segments(mine), mine[-1].delta, mine[-1].accountant), mine[-1].epsilon)
            for run, mine in runs.items()]
