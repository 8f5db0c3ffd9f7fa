"""ε from a history of DP-SGD segments, by Opacus (PRV or RDP) and, independently, by Google's
dp-accounting (PLD). The history is always rebuilt from the ledger, so accounting is cumulative
across rounds and restarts by construction: there is no per-round accountant to forget."""

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


def opacus_epsilon(history: Iterable[Segment], delta: float, accountant: str = "prv") -> float:
    from opacus.accountants import create_accountant

    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
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
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), int(n))
        for s, q, n in history if n > 0]
    if not events:
        return 0.0
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "prv") -> float:
    """The smallest σ (to 1%) whose ε over `steps` Poisson-sampled steps stays within `epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    if epsilon <= 0 or not math.isfinite(epsilon):
        raise FedrecError(f"target ε must be a positive number, got {epsilon}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps,
                                              accountant=check_accountant(accountant),
                                              epsilon_tolerance=0.01))
        except ValueError as exc:
            raise FedrecError(f"no noise level reaches ε={epsilon} at δ={delta} over {steps} steps "
                              f"with sample rate {sample_rate:.4g}: {exc}",
                              hint="Raise the budget, or plan fewer rounds or epochs.") from exc
