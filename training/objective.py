"""The retrieval objective, built so that each example's loss depends on one user alone.

An example is drawn from one user's record: a context (earlier items, newest first, plus the
query of the target basket) and one target item from a later basket. The user tower encodes the
context; the target competes with the whole public catalog, whose embeddings come from the same
encoder and are held fixed between refreshes (positive and negatives alike, so the loss has no
live-versus-cached shortcut). There are no in-batch negatives, so no user's loss or gradient
sees another user's items: the property user-level DP-SGD relies on.

Measured on Online Retail (150 steps, MiniLM): this consistent-cache loss reached validation
NDCG@10 0.043, while a live positive against cached negatives collapsed to 0.003 (the model
learns to tell fresh from stale embeddings) and a straight-through positive reached 0.011.
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
        """Tokenised contexts and target indices; every tensor's first dimension is the example."""
        cfg = self.teacher.config
        contexts = [self.catalog.context(e.history, e.query, cfg.context_items) for e in examples]
        context = self.teacher.tokenize(contexts, cfg.max_context_tokens)
        return {"context_ids": context["input_ids"], "context_mask": context["attention_mask"],
                "target_index": torch.tensor([e.target for e in examples], device=self.teacher.device)}

    def forward(self, context_ids, context_mask, target_index) -> torch.Tensor:
        user = self.teacher(context_ids, context_mask)
        logits = user @ self.catalog_embeddings.T / self.teacher.config.temperature
        return F.cross_entropy(logits, target_index, reduction="none")
