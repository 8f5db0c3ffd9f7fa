"""What a region will spend before it trains anything: a round's shape and noise (`DPPlan`, what
DP-SGD runs on) and `fedrec privacy plan`'s report of the noise a budget needs. Free of torch, so
the accounting side of a region never loads the training loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedrec.errors import FedrecError
from fedrec.privacy.accountant import noise_for_budget
from fedrec.privacy.budget import RegionBudget

MAX_SAMPLE_RATE = 0.25      # above this, subsampling barely amplifies privacy: take more, smaller steps
# Above this, the noise on each averaged step exceeds a tenth of a clipped user gradient.
NOISY_STEP = 0.1


@dataclass(frozen=True)
class DPPlan:
    """What one round will spend: `steps` Poisson-sampled steps at rate q with noise σ."""

    users: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float


def round_shape(users: int, batch_size: int, local_epochs: float) -> tuple[float, int]:
    """Sample rate q = B/N (at most MAX_SAMPLE_RATE) and the steps of `local_epochs` expected
    passes over the users."""
    if users <= 0:
        raise FedrecError("this region has no users with training data")
    sample_rate = min(MAX_SAMPLE_RATE, batch_size / users)
    return sample_rate, max(1, round(local_epochs * math.ceil(1 / sample_rate)))


@dataclass
class PrivacyPlan:
    users: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    noise_per_step: float            # σ / expected batch: noise std relative to the clip norm C
    warnings: list[str] = field(default_factory=list)


def plan_privacy(users: int, batch_size: int, rounds: int, local_epochs: float, epsilon: float,
                 delta: float, accountant: str = "prv") -> PrivacyPlan:
    RegionBudget(epsilon=epsilon, delta=delta, accountant=accountant).validate(users)
    sample_rate, steps = round_shape(users, batch_size, local_epochs)
    sigma = noise_for_budget(epsilon, delta, sample_rate, steps * rounds, accountant)
    plan = PrivacyPlan(users, batch_size, sample_rate, steps, rounds, sigma, sigma / (sample_rate * users))
    if plan.noise_per_step > NOISY_STEP:
        plan.warnings.append(f"each averaged step carries noise {plan.noise_per_step:.2f}·C: with {users} users "
                             "this region is too small for useful DP at this budget; expect little or no "
                             "gain from its updates (raise ε, plan fewer rounds, or let it join without training)")
    if sample_rate > 0.5:
        plan.warnings.append(f"sample rate {sample_rate:.2f} is high: subsampling barely amplifies privacy; "
                             "use a smaller batch")
    return plan
