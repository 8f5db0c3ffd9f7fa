"""ε from a history of DP-SGD segments, by Opacus (PRV or RDP) and, independently, by Google's
dp-accounting (PLD). The history is always rebuilt from the ledger, so accounting is cumulative
across rounds, restarts and runs by construction: there is no per-round accountant to forget.

Composition is commutative, and n steps of one Poisson-sampled Gaussian mechanism followed by m
more of the same are n + m steps of it, so a history is first compacted to one segment per
distinct (σ, q): the same ε, at a cost that no longer grows with the number of rounds."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

from fedrec.errors import FedrecError

Segment = tuple[float, float, int]      # (noise multiplier σ, sample rate q, steps)
ACCOUNTANTS = ("prv", "rdp")


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise FedrecError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return name


def compact(history: Iterable[Segment]) -> list[Segment]:
    """One segment per distinct (σ, q) with the steps summed; empty segments dropped."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if int(n) > 0:
            steps[float(sigma), float(q)] = steps.get((float(sigma), float(q)), 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def opacus_epsilon(history: Iterable[Segment], delta: float, accountant: str = "prv") -> float:
    from opacus.accountants import create_accountant

    history = compact(history)
    if not history:
        return 0.0
    acc = create_accountant(check_accountant(accountant))
    acc.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def pld_epsilon(history: Iterable[Segment], delta: float) -> float:
    """Google dp-accounting's privacy-loss-distribution accountant, for the audit's second opinion."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in compact(history)]
    if not events:
        return 0.0
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "prv", spent: Iterable[Segment] = ()) -> float:
    """The smallest σ (to 1%) such that `steps` more Poisson-sampled steps at rate `sample_rate`,
    composed after the `spent` history, keep the total ε within `epsilon`."""
    if epsilon <= 0 or not math.isfinite(epsilon):
        raise FedrecError(f"target ε must be a positive number, got {epsilon}")
    spent = compact(spent)

    def total(sigma: float) -> float:
        return opacus_epsilon(spent + [(sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.3, 1.0
    while total(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise FedrecError(f"no noise level keeps ε within {epsilon} at δ={delta} over {steps} more steps "
                              f"with sample rate {sample_rate:.4g}"
                              + (f" after the {opacus_epsilon(spent, delta, accountant):.3f} already spent" if spent else ""),
                              hint="Raise the budget, or plan fewer rounds or epochs.")
    if total(low) <= epsilon:
        return low
    while high - low > 0.01 * low:
        middle = (low + high) / 2
        low, high = (low, middle) if total(middle) <= epsilon else (middle, high)
    return high
