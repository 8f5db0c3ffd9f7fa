"""The retrieval objective, built so that each example's loss depends on one user alone.

An example comes from one user's record: either the history before one of their training baskets
(items newest first, with basket ages) predicts that basket's items, or one of their searches: the
query's text (a one-item history, as search serves it: `Teacher.search_rows`) predicts its relevant
items, weighted by their graded relevance. The user vector scores the whole public catalog; the
loss is the softmax cross-entropy of the target items (multi-target: their weighted mean
log-probability), with a history's own items masked out. There are no in-batch negatives, so no
user's loss or gradient sees another user's items or queries: the property user-level DP-SGD
relies on (`tests/test_privacy.py`, `tests/test_queries.py` check it on per-user gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fedrec.data.silo import UserRecord, history_newest_first
from fedrec.model.teacher import Teacher, Tower, pad_histories

QueryVectors = dict[str, np.ndarray]      # query string → its text vector (`query_vectors`)
Point = tuple[str, int]                    # ("basket", training basket) or ("search", search index)
QUERY_CHUNK = 1024                         # query strings encoded between progress updates


@dataclass
class Example:
    history: np.ndarray      # item positions, newest first (empty for a search)
    ages: np.ndarray         # basket age of each history item (0 = most recent)
    targets: np.ndarray      # the items to predict
    gains: np.ndarray | None = None      # each target's weight (None: all 1)
    query: np.ndarray | None = None      # a search's query text vector (None: a basket)


def basket_points(user: UserRecord) -> list[int]:
    """Training baskets that can be predicted from the ones before them (a lone basket only by
    completion, which needs two items)."""
    baskets = user.train_baskets
    if len(baskets) >= 2:
        return list(range(1, len(baskets)))
    return [0] if len(baskets) == 1 and len(baskets[0]) >= 2 else []


def prediction_points(user: UserRecord) -> list[Point]:
    """Everything one user can be asked to predict: their baskets, then their searches."""
    return [("basket", b) for b in basket_points(user)] + [("search", s) for s in range(len(user.searches))]


def can_train(user: UserRecord) -> bool:
    return bool(user.searches) or bool(basket_points(user))


def query_vectors(teacher: Teacher, users: list[UserRecord]) -> QueryVectors:
    """The text vector of every query string the users searched, each encoded once by the frozen
    encoder (the strings are the region's private data: this runs where they are). The encoder is
    loaded only when there is a query."""
    queries = sorted({search.query for user in users for search in user.searches})
    if not queries:
        return {}
    chunks = tqdm(range(0, len(queries), QUERY_CHUNK), desc=f"encoding {len(queries):,} queries", unit="chunk",
                  leave=False)
    vectors = [teacher.text_vectors(teacher.encoder.encode_queries(queries[start:start + QUERY_CHUNK])
                                    .to(teacher.device)).cpu().numpy() for start in chunks]
    return dict(zip(queries, np.concatenate(vectors)))


def make_example(user: UserRecord, point: Point, rng: np.random.Generator,
                 queries: QueryVectors | None = None) -> Example:
    """A search predicts its relevant items from its query text (`queries`: `query_vectors`);
    basket `b` is predicted from the earlier ones, and for a user with a single training basket
    by completion (a random part of it predicts the rest)."""
    kind, index = point
    if kind == "search":
        search = user.searches[index]
        empty = np.zeros(0, dtype=np.int64)
        return Example(empty, empty, search.items, search.gains, queries[search.query])
    baskets = user.train_baskets
    if index > 0:
        return Example(*history_newest_first(baskets[:index]), baskets[index])
    shuffled = rng.permutation(baskets[0])
    cut = int(rng.integers(1, len(shuffled)))
    return Example(shuffled[:cut], np.zeros(cut, dtype=np.int64), shuffled[cut:])


def sample_examples(user: UserRecord, rng: np.random.Generator, count: int = 1,
                    queries: QueryVectors | None = None) -> list[Example]:
    """`count` of the user's prediction points, distinct, drawn at random (all of them if fewer)."""
    points = prediction_points(user)
    picked = rng.choice(len(points), min(count, len(points)), replace=False)
    return [make_example(user, points[int(i)], rng, queries) for i in picked]


def batch_inputs(examples: list[Example], history_items: int, max_targets: int, rng: np.random.Generator,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Padded tensors whose first dimension is the example: what `RetrievalObjective` takes. Every
    row has the same shapes (as `vmap` needs): a batch with a search gives every row a query
    vector (zeros for baskets) and `is_query` picks the path; a batch without has width-0 queries."""
    history, ages, mask = pad_histories([(e.history, e.ages) for e in examples], history_items, device)
    width = min(max_targets, max(len(e.targets) for e in examples))
    targets = np.zeros((len(examples), width), dtype=np.int64)
    weights = np.zeros((len(examples), width), dtype=np.float32)
    text_dim = next((len(e.query) for e in examples if e.query is not None), 0)
    queries = np.zeros((len(examples), text_dim), dtype=np.float32)
    is_query = np.zeros(len(examples), dtype=bool)
    for row, example in enumerate(examples):
        gains = np.ones(len(example.targets)) if example.gains is None else example.gains
        chosen = np.arange(len(example.targets)) if len(example.targets) <= width \
            else rng.choice(len(example.targets), width, replace=False)
        targets[row, :len(chosen)], weights[row, :len(chosen)] = example.targets[chosen], gains[chosen]
        if example.query is not None:
            queries[row], is_query[row] = example.query, True
    return {"history": history, "ages": ages, "mask": mask,
            "targets": torch.as_tensor(targets, device=device),
            "target_weights": torch.as_tensor(weights, device=device),
            "query": torch.as_tensor(queries, device=device),
            "is_query": torch.as_tensor(is_query, device=device)}


class RetrievalObjective(torch.nn.Module):
    """Per-example loss: target items against the full catalog, history masked. A search row is
    scored as search serves it: the tower's behavioural part weighted by `model.search_behaviour`."""

    def __init__(self, tower: Tower):
        super().__init__()
        self.tower = tower

    def forward(self, history, ages, mask, targets, target_weights, query, is_query) -> torch.Tensor:
        users = self.tower.users(history, ages, mask)
        behaviour = None
        if query.shape[-1]:          # a static shape, so this branch is the same for every row under vmap
            users = torch.where(is_query[:, None], self.tower.query_users(query), users)
            weight = self.tower.config.search_behaviour
            behaviour = torch.where(is_query, weight, 1.0).to(users.dtype)[:, None]
        logits = self.tower.scores(users, behaviour)
        seen = torch.zeros_like(logits).scatter(1, history, mask.to(logits.dtype)) > 0
        log_probs = torch.log_softmax(logits.masked_fill(seen, -1e9), dim=-1)
        picked = log_probs.gather(1, targets) * target_weights
        return -picked.sum(1) / target_weights.sum(1).clamp(min=1e-12)
