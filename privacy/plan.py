"""`fedrec privacy plan`: the noise a region needs for its budget, before it trains anything."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedrec.privacy.accountant import noise_for_budget
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.dp_sgd import round_shape

# Above this, the noise on each averaged step exceeds a tenth of a clipped user gradient.
NOISY_STEP = 0.1


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
