"""The retrieval objective, built so that each example's loss depends on one user alone.

An example comes from one user's record: the history before one of their training baskets (items
newest first, with basket ages) predicts that basket's items. The user vector scores the whole
public catalog; the loss is the softmax cross-entropy of the target items (multi-target: their mean
log-probability), with the history's own items masked out. There are no in-batch negatives, so no
user's loss or gradient sees another user's items: the property user-level DP-SGD relies on
(`tests/test_privacy.py` checks it on per-user gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.data.silo import UserRecord, history_newest_first
from fedrec.model.teacher import Tower, pad_histories


@dataclass
class Example:
    history: np.ndarray      # item positions, newest first
    ages: np.ndarray         # basket age of each history item (0 = most recent)
    targets: np.ndarray      # the items to predict


def can_train(user: UserRecord) -> bool:
    baskets = user.train_baskets
    return len(baskets) >= 2 or (len(baskets) == 1 and len(baskets[0]) >= 2)


def prediction_points(user: UserRecord) -> list[int]:
    """Training baskets that can be predicted from the ones before them (basket 0 only by completion)."""
    n = len(user.train_baskets)
    return list(range(1, n)) if n >= 2 else [0]


def make_example(user: UserRecord, basket: int, rng: np.random.Generator) -> Example:
    """Next-basket prediction of training basket `basket` from the earlier ones; for a user with a
    single training basket, basket completion (a random part of it predicts the rest)."""
    baskets = user.train_baskets
    if basket > 0:
        return Example(*history_newest_first(baskets[:basket]), baskets[basket])
    shuffled = rng.permutation(baskets[0])
    cut = int(rng.integers(1, len(shuffled)))
    return Example(shuffled[:cut], np.zeros(cut, dtype=np.int64), shuffled[cut:])


def sample_example(user: UserRecord, rng: np.random.Generator) -> Example:
    points = prediction_points(user)
    return make_example(user, points[int(rng.integers(len(points)))], rng)


def batch_inputs(examples: list[Example], history_items: int, max_targets: int, rng: np.random.Generator,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Padded tensors whose first dimension is the example: what `RetrievalObjective` takes."""
    history, ages, mask = pad_histories([(e.history, e.ages) for e in examples], history_items, device)
    width = min(max_targets, max(len(e.targets) for e in examples))
    targets = np.zeros((len(examples), width), dtype=np.int64)
    target_mask = np.zeros((len(examples), width), dtype=bool)
    for row, example in enumerate(examples):
        chosen = example.targets if len(example.targets) <= width else rng.choice(example.targets, width, replace=False)
        targets[row, :len(chosen)], target_mask[row, :len(chosen)] = chosen, True
    return {"history": history, "ages": ages, "mask": mask,
            "targets": torch.as_tensor(targets, device=device),
            "target_mask": torch.as_tensor(target_mask, device=device)}


class RetrievalObjective(torch.nn.Module):
    """Per-example loss: target items against the full catalog, history masked."""

    def __init__(self, tower: Tower):
        super().__init__()
        self.tower = tower

    def forward(self, history, ages, mask, targets, target_mask) -> torch.Tensor:
        logits = self.tower.scores(self.tower.users(history, ages, mask))
        seen = torch.zeros_like(logits).scatter(1, history, mask.to(logits.dtype)) > 0
        log_probs = torch.log_softmax(logits.masked_fill(seen, -1e9), dim=-1)
        picked = log_probs.gather(1, targets) * target_mask
        return -picked.sum(1) / target_mask.sum(1).clamp(min=1)
