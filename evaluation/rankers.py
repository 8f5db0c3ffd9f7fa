"""Models that score the whole catalog for a user: baselines and the text encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedrec.data.silo import Silo


@dataclass
class EvalCase:
    history: np.ndarray          # item indices, newest first
    query: str
    targets: np.ndarray


class Ranker(Protocol):
    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        """users × items scores; higher ranks first."""


def training_baskets(silos: dict[str, Silo]):
    for silo in silos.values():
        for user in silo.users:
            yield from user.train_baskets


class Popularity:
    """Items by how many training baskets hold them: pooled (`per_region=False`) or per region."""

    def __init__(self, silos: dict[str, Silo], per_region: bool = False):
        n_items = len(next(iter(silos.values())).catalog)
        def counts(group):
            c = np.zeros(n_items)
            for basket in training_baskets(group):
                c[basket] += 1
            return c
        self.global_counts = counts(silos)
        self.region_counts = {r: counts({r: s}) for r, s in silos.items()} if per_region else {}

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        counts = self.region_counts.get(region, self.global_counts)
        return np.broadcast_to(counts, (len(cases), len(counts)))


class CoOccurrence:
    """"Bought together": summed co-purchase counts of the history's items, popularity breaks ties."""

    def __init__(self, silos: dict[str, Silo]):
        from scipy import sparse

        n_items = len(next(iter(silos.values())).catalog)
        rows, cols = [], []
        for basket_id, basket in enumerate(training_baskets(silos)):
            rows.extend([basket_id] * len(basket))
            cols.extend(basket)
        incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                      shape=(max(rows, default=0) + 1, n_items))
        self.counts = (incidence.T @ incidence).tocsr()
        self.counts.setdiag(0)
        self.popularity = np.asarray(incidence.sum(0)).ravel()

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        out = np.empty((len(cases), self.counts.shape[0]))
        tie_break = 1e-6 * self.popularity / max(self.popularity.max(), 1.0)
        for u, case in enumerate(cases):
            out[u] = np.asarray(self.counts[case.history].sum(0)).ravel() + tie_break
        return out


class EncoderRanker:
    """Dot product of L2-normalised user-context and item embeddings from a teacher or student."""

    def __init__(self, encoder, catalog, context_items: int, batch_size: int = 128):
        self.encoder, self.catalog = encoder, catalog
        self.context_items, self.batch_size = context_items, batch_size
        self.items = encoder.encode_items(catalog, batch_size).cpu().numpy()

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        texts = [self.catalog.context(c.history, c.query, self.context_items) for c in cases]
        users = self.encoder.encode_contexts(texts, self.batch_size).cpu().numpy()
        return users @ self.items.T
