"""Canary users for the empirical audit: synthetic purchase histories over the public catalog, and
how much the trained tower remembers each one.

A canary is shaped like a real user (a few baskets of distinct items, trained through the same
objective) but its items are drawn from the public catalog alone, disjoint between canaries where
the catalog is large enough, so what the tower learns from one canary is not learnt from another.
Its membership score is its loss under the trained tower (lower: better remembered), over every
basket it can predict from the ones before.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.data.silo import UserRecord, history_newest_first
from fedrec.errors import FedrecError
from fedrec.training.objective import Example, RetrievalObjective, batch_inputs

CANARY_PREFIX = "audit canary "
CANARY_BASKETS = 3
CANARY_BASKET_ITEMS = 4


def make_canaries(catalog_items: int, count: int, rng: np.random.Generator,
                  prefix: str = CANARY_PREFIX) -> list[UserRecord]:
    """`count` synthetic users of CANARY_BASKETS baskets of CANARY_BASKET_ITEMS catalog items,
    items disjoint across users until the catalog runs out (then drawn again)."""
    per_user = CANARY_BASKETS * CANARY_BASKET_ITEMS
    if catalog_items < per_user:
        raise FedrecError(f"a catalog of {catalog_items} items cannot fill a canary of {per_user} distinct items")
    rounds = -(-count * per_user // catalog_items)
    pool = np.concatenate([rng.permutation(catalog_items) for _ in range(rounds)])
    users = []
    for n in range(count):
        items = pool[n * per_user:(n + 1) * per_user]
        if len(set(items.tolist())) < per_user:      # a wrap-around repeated an item: draw this one afresh
            items = rng.choice(catalog_items, per_user, replace=False)
        baskets = [np.sort(b) for b in items.reshape(CANARY_BASKETS, CANARY_BASKET_ITEMS)]
        users.append(UserRecord(f"{prefix}{n}", baskets, [""] * CANARY_BASKETS, CANARY_BASKETS))
    return users


@torch.no_grad()
def canary_losses(objective: RetrievalObjective, canaries: list[UserRecord], max_targets: int) -> np.ndarray:
    """Each canary's mean loss over its baskets after the first, each predicted from the ones before."""
    objective.eval()
    device = next(objective.parameters()).device
    examples = [Example(*history_newest_first(user.baskets[:basket]), user.baskets[basket])
                for user in canaries for basket in range(1, CANARY_BASKETS)]
    inputs = batch_inputs(examples, objective.tower.config.history_items, max_targets,
                          np.random.default_rng(0), device)     # no draw: canary baskets fit max_targets
    losses = objective(**inputs).cpu().numpy().reshape(len(canaries), CANARY_BASKETS - 1)
    return losses.mean(1)
