"""The retrieval objective, built so that each example's loss depends on one user alone.

An example is drawn from one user's record: a context (earlier items, newest first, plus the
query of the target basket) and one target item from a later basket. The target competes with
the whole public catalog, embedded by the current model and held fixed between refreshes.
There are no in-batch negatives, so no user's loss or gradient sees another user's items —
the property user-level DP-SGD relies on.

The teacher runs without dropout, so the live and cached embeddings of an item agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.data.silo import Catalog, UserRecord, history_newest_first


@dataclass
class Example:
    history: np.ndarray      # item indices, newest first
    query: str
    target: int


def can_train(user: UserRecord) -> bool:
    baskets = user.train_baskets
    return len(baskets) >= 2 or (len(baskets) == 1 and len(baskets[0]) >= 2)


def sample_example(user: UserRecord, rng: np.random.Generator) -> Example:
    """Next-basket prediction from the user's training history; with a single training basket,
    basket completion (the rest of that basket predicts one of its items)."""
    baskets = user.train_baskets
    if len(baskets) >= 2:
        j = int(rng.integers(1, len(baskets)))
        return Example(history_newest_first(baskets[:j]), user.queries[j], int(rng.choice(baskets[j])))
    shuffled = rng.permutation(baskets[0])
    return Example(shuffled[1:], user.queries[0], int(shuffled[0]))


class RetrievalObjective(torch.nn.Module):
    """Per-example softmax cross-entropy of the target item against the full catalog."""

    def __init__(self, teacher, catalog: Catalog):
        super().__init__()
        self.teacher, self.catalog = teacher, catalog
        self.register_buffer("catalog_embeddings", torch.zeros(len(catalog), teacher.dim), persistent=False)

    def refresh_catalog(self, batch_size: int = 128) -> None:
        self.catalog_embeddings = self.teacher.encode_items(self.catalog, batch_size)

    def inputs(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Tokenised contexts and targets; every tensor's first dimension is the example."""
        cfg, teacher = self.teacher.config, self.teacher
        contexts = [self.catalog.context(e.history, e.query, cfg.context_items) for e in examples]
        targets = [self.catalog.text(e.target) for e in examples]
        context = teacher.tokenize(contexts, cfg.max_context_tokens)
        target = teacher.tokenize(targets, cfg.max_item_tokens)
        return {
            "context_ids": context["input_ids"], "context_mask": context["attention_mask"],
            "target_ids": target["input_ids"], "target_mask": target["attention_mask"],
            "target_index": torch.tensor([e.target for e in examples], device=teacher.device),
        }

    def forward(self, context_ids, context_mask, target_ids, target_mask, target_index) -> torch.Tensor:
        user = self.teacher(context_ids, context_mask)
        live = self.teacher(target_ids, target_mask)
        cached = self.catalog_embeddings[target_index]
        # Straight-through: the target's logit takes the same (cached) value as every other item,
        # so a live-vs-cached difference is no shortcut; its gradient still trains the item tower.
        target = cached + (live - live.detach())
        logits = user @ self.catalog_embeddings.T
        positive = (user * target).sum(-1)
        logits = logits.scatter(1, target_index[:, None], positive[:, None])
        return F.cross_entropy(logits / self.teacher.config.temperature, target_index, reduction="none")
