"""User-level DP-SGD on the teacher's tower with Opacus.

One record per user; each step Poisson-samples users at rate q, draws one example from each
sampled user's record, clips each user's gradient to C and adds Gaussian noise σ·C (Opacus'
DPOptimizer). Per-user gradients come from `torch.func`: `vmap` over users of the gradient of
one user's loss, so a row's gradient is a function of that user's example and the public catalog
alone, by construction. The tower is small (a few hundred thousand numbers), so this is cheap.

Before clipping, each user's gradient of the tower's shared parameters (`Tower.SHARED`) is scaled
by `train.dp_shared_scale`: a fixed map, the same for every user, so the clipped gradient still has
norm at most C and the accounting is unchanged. Unscaled, those few parameters take most of each
user's clipped norm and leave the item rows, which the noise hits hardest, with little signal.
"""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from fedrec.config import TrainConfig
from fedrec.data.silo import UserRecord
from fedrec.errors import FedrecError
from fedrec.faults import freeze_point
from fedrec.privacy.plan import DPPlan
from fedrec.training.objective import Example, QueryVectors, RetrievalObjective, batch_inputs, sample_examples
from fedrec.training.trainer import make_optimizer

INPUTS = ("history", "ages", "mask", "targets", "target_weights", "query", "is_query")


def poisson_sample(rng: np.random.Generator, users: int, sample_rate: float) -> np.ndarray:
    """Each user independently with probability q: the sampling the accountant assumes."""
    return np.flatnonzero(rng.random(users) < sample_rate)


def per_user_gradients(objective: RetrievalObjective, inputs: dict[str, torch.Tensor],
                       chunk_size: int | None = None, shared_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Each parameter's gradient for each row of `inputs` (B × parameter shape), each row computed
    from that row alone, the tower's shared parameters' scaled by `shared_scale` (see the module);
    `chunk_size` rows at a time bounds memory (None: the whole batch at once, fastest on CPU)."""
    params = {name: p.detach() for name, p in objective.named_parameters()}
    buffers = dict(objective.named_buffers())

    def one_user_loss(params, *row):
        return functional_call(objective, (params, buffers), tuple(t.unsqueeze(0) for t in row)).squeeze(0)

    grads = vmap(grad(one_user_loss), in_dims=(None, *[0] * len(INPUTS)), chunk_size=chunk_size)(
        params, *[inputs[name] for name in INPUTS])
    shared = {f"tower.{name}" for name in objective.tower.SHARED}
    return {name: g * shared_scale if name in shared and shared_scale != 1.0 else g for name, g in grads.items()}


def mean_user_gradients(objective: RetrievalObjective, examples: list[list[Example]], cfg: TrainConfig,
                        rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """One row per user: the mean of their examples' gradients (`per_user_gradients`, one pass per
    example index). A user's row still depends on that user's data alone and is clipped as one, so
    averaging more of their data costs no privacy and steadies the direction the clip keeps."""
    history_items = objective.tower.config.history_items
    total: dict[str, torch.Tensor] = {}
    for j in range(max(map(len, examples))):
        rows = [i for i, own in enumerate(examples) if len(own) > j]      # j = 0: every user
        inputs = batch_inputs([examples[i][j] for i in rows], history_items, cfg.max_targets, rng, device)
        grads = per_user_gradients(objective, inputs, shared_scale=cfg.dp_shared_scale)
        if not total:
            total = grads
            continue
        index = torch.as_tensor(rows, device=device)
        for name, g in grads.items():
            total[name].index_add_(0, index, g)
    counts = torch.tensor([len(own) for own in examples], dtype=torch.float32, device=device)
    return {name: g / counts.view(-1, *[1] * (g.dim() - 1)) for name, g in total.items()}


def train_private(objective: RetrievalObjective, users: list[UserRecord], cfg: TrainConfig,
                  plan: DPPlan, desc: str = "dp-sgd",
                  regulariser: Callable[[], torch.Tensor] | None = None, *,
                  queries: QueryVectors | None = None,
                  sampler: Callable[[np.random.Generator, int, float], np.ndarray] = poisson_sample) -> None:
    """Runs `plan.steps` DP-SGD steps on the objective's tower.

    User sampling, example choice and noise all come from fresh OS entropy, never from a configured
    seed: two releases with the same seed would share their noise and their sample, and the
    accountant assumes they do not. Nothing computed from the sampled users (not even their loss)
    is returned: only the noised parameters leave this function.
    `regulariser` (FedProx) is data-independent, so its gradient is added after the noise.
    `queries` holds the text vectors of the users' searches (`query_vectors`): a sampled user's one
    example is one of their baskets or one of their searches.
    `sampler` picks each step's users; the accountant assumes Poisson sampling, the default, and
    only the empirical audit's broken-sampler control passes another.
    """
    if len(users) != plan.users:
        raise FedrecError(f"plan is for {plan.users} users but {len(users)} were given")
    named = dict(objective.named_parameters())
    params = list(named.values())
    if not params:
        raise FedrecError("the tower has no parameters: nothing would train")
    # Here, not at the top: Opacus takes seconds to import, and each Flower message runs in a new
    # process, so a region's evaluate and query replies would pay for it without training.
    from opacus.optimizers import DPOptimizer

    device = params[0].device
    rng = np.random.default_rng(secrets.randbits(128))
    noise = torch.Generator(device).manual_seed(secrets.randbits(63))
    optimizer = DPOptimizer(make_optimizer(objective, cfg), noise_multiplier=plan.noise_multiplier,
                            max_grad_norm=plan.max_grad_norm,
                            expected_batch_size=plan.sample_rate * plan.users,
                            generator=noise)
    if len(optimizer.params) != len(params):
        raise FedrecError("the DP optimizer does not hold every tower parameter")
    objective.train()
    bar = tqdm(range(plan.steps), desc=desc, leave=False, unit="step")
    for step in bar:
        if step == plan.steps // 2:
            freeze_point("mid-training", desc)
        chosen = sampler(rng, plan.users, plan.sample_rate)
        optimizer.zero_grad(set_to_none=True)
        if len(chosen):
            examples = [sample_examples(users[i], rng, cfg.dp_examples_per_user, queries) for i in chosen]
            grads = mean_user_gradients(objective, examples, cfg, rng, device)
        else:   # an empty Poisson batch still releases noise and still counts
            grads = {name: torch.zeros((0, *p.shape), dtype=p.dtype, device=device) for name, p in named.items()}
        for name, p in named.items():
            p.grad_sample = grads[name]
        if optimizer.pre_step():                  # clip per user, add noise, scale
            if regulariser is not None:
                extra = torch.autograd.grad(regulariser(), params)
                for p, g in zip(params, extra):
                    p.grad.add_(g)
            optimizer.original_optimizer.step()
        bar.set_postfix(batch=len(chosen))
    for p in params:
        p.grad_sample = None
