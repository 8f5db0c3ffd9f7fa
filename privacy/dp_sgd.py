"""User-level DP-SGD on the teacher's adapters with Opacus.

One record per user; each step Poisson-samples users at rate q, draws one example from each
sampled user's record, clips each user's gradient to C and adds Gaussian noise σ·C (Opacus'
DPOptimizer). Per-user gradients come from Opacus' GradSampleModule hooks on the LoRA layers;
the encoder runs twice per example (context, target) and Opacus sums both per user.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from tqdm.auto import tqdm

from fedrec.config import TrainConfig
from fedrec.data.silo import UserRecord
from fedrec.errors import FedrecError
from fedrec.faults import freeze_point
from fedrec.training.objective import RetrievalObjective, sample_example
from fedrec.training.trainer import make_optimizer


@dataclass(frozen=True)
class DPPlan:
    """What one round will spend: `steps` Poisson-sampled steps at rate q with noise σ."""

    users: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float


def round_shape(users: int, batch_size: int, local_epochs: float) -> tuple[float, int]:
    """Sample rate q = B/N and the steps of `local_epochs` expected passes over the users."""
    if users <= 0:
        raise FedrecError("this region has no users with training data")
    sample_rate = min(1.0, batch_size / users)
    return sample_rate, max(1, round(local_epochs * math.ceil(1 / sample_rate)))


def train_private(objective: RetrievalObjective, users: list[UserRecord], cfg: TrainConfig,
                  plan: DPPlan, desc: str = "dp-sgd",
                  regulariser: Callable[[], torch.Tensor] | None = None) -> float:
    """Runs `plan.steps` DP-SGD steps and returns the mean loss of the sampled examples.

    User sampling, example choice and noise all come from fresh OS entropy, never from a configured
    seed: two releases with the same seed would share their noise and their sample, and the
    accountant assumes they do not.
    `regulariser` (FedProx) is data-independent, so its gradient is added after the noise.
    """
    if len(users) != plan.users:
        raise FedrecError(f"plan is for {plan.users} users but {len(users)} were given")
    params = list(objective.teacher.adapter_parameters().values())
    rng = np.random.default_rng(secrets.randbits(128))
    noise = torch.Generator(params[0].device if params else "cpu").manual_seed(secrets.randbits(63))
    model = GradSampleModule(objective, loss_reduction="mean")
    optimizer = DPOptimizer(make_optimizer(objective, cfg), noise_multiplier=plan.noise_multiplier,
                            max_grad_norm=plan.max_grad_norm,
                            expected_batch_size=plan.sample_rate * plan.users,
                            generator=noise)
    if len(optimizer.params) != len(params) or not params:
        raise FedrecError("the DP optimizer does not hold the adapters: nothing would train")
    objective.teacher.train()
    total, count = 0.0, 0
    try:
        bar = tqdm(range(plan.steps), desc=desc, leave=False, unit="step")
        for step in bar:
            if step == plan.steps // 2:
                freeze_point("mid-training", desc)
            if step == 0 or (cfg.refresh_catalog_every and step % cfg.refresh_catalog_every == 0):
                objective.refresh_catalog(cfg.eval_batch_size)
            chosen = np.flatnonzero(rng.random(plan.users) < plan.sample_rate)
            optimizer.zero_grad(set_to_none=True)
            if len(chosen):
                examples = [sample_example(users[i], rng) for i in chosen]
                losses = model(**objective.inputs(examples))
                losses.mean().backward()
                total, count = total + float(losses.detach().sum()), count + len(chosen)
            else:   # an empty Poisson batch still releases noise and still counts
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if optimizer.pre_step():                  # clip per user, add noise, scale
                if regulariser is not None:
                    extra = torch.autograd.grad(regulariser(), params)
                    for p, g in zip(params, extra):
                        p.grad.add_(g)
                optimizer.original_optimizer.step()
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", batch=len(chosen))
    finally:
        model.to_standard_module()    # remove the hooks: the teacher is used without DP afterwards
    return total / max(count, 1)
