"""Models that score the whole catalog for a user: the teacher and the peers it must beat.

The peers (popularity, co-occurrence, ItemKNN, EASE) are non-private references: they pool every
region's training baskets in one place, which the federation exists to avoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from fedrec.data.silo import Silo

AGE_DECAY = 0.8     # the peers weigh a history item by AGE_DECAY ** (its basket age)


@dataclass
class EvalCase:
    history: np.ndarray          # item indices, newest first
    ages: np.ndarray             # basket age of each history item (0 = most recent)
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


def interaction_matrix(silos: dict[str, Silo]):
    """Users × items (binary) over every region's training baskets, as a scipy CSR matrix."""
    from scipy import sparse

    n_items = len(next(iter(silos.values())).catalog)
    rows, cols, row = [], [], 0
    for silo in silos.values():
        for user in silo.users:
            items = np.unique(np.concatenate(user.train_baskets)) if user.train_baskets else []
            rows.extend([row] * len(items))
            cols.extend(items)
            row += 1
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(row, n_items))


def weighted_histories(cases: list[EvalCase], n_items: int) -> np.ndarray:
    """Cases × items: each history item weighted by AGE_DECAY ** age (its newest occurrence)."""
    out = np.zeros((len(cases), n_items))
    for row, case in enumerate(cases):
        np.maximum.at(out[row], case.history, AGE_DECAY ** case.ages.astype(float))
    return out


class ItemToItem:
    """Scores = age-weighted history × an item-item matrix; subclasses build the matrix."""

    similarity: np.ndarray

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        return weighted_histories(cases, len(self.similarity)) @ self.similarity


class ItemKNN(ItemToItem):
    """Item-based k-nearest neighbours: shrunk cosine similarity of the item columns, each item's
    `neighbours` most similar items kept (Sarwar et al. 2001; shrinkage as in Koren 2008)."""

    def __init__(self, silos: dict[str, Silo], neighbours: int = 100, shrink: float = 50.0):
        self.similarity = item_knn_similarity(gram_matrix(silos), neighbours, shrink)


def item_knn_similarity(overlap: np.ndarray, neighbours: int, shrink: float) -> np.ndarray:
    norms = np.sqrt(np.diag(overlap))
    similarity = overlap / (np.outer(norms, norms) + shrink)
    np.fill_diagonal(similarity, 0.0)
    if neighbours < len(similarity):
        weakest = np.argpartition(-similarity, neighbours, axis=0)[neighbours:]
        np.put_along_axis(similarity, weakest, 0.0, axis=0)
    return similarity


class EASE(ItemToItem):
    """Embarrassingly Shallow Autoencoder (Steck 2019): the closed-form item-item ridge regression
    B = I − P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, with a zero diagonal."""

    def __init__(self, gram: np.ndarray, l2: float):
        self.l2 = l2
        precision = np.linalg.inv(gram + l2 * np.eye(len(gram)))
        self.similarity = -precision / np.diag(precision)
        np.fill_diagonal(self.similarity, 0.0)

    @classmethod
    def fit(cls, silos: dict[str, Silo], l2: float = 300.0) -> "EASE":
        return cls(gram_matrix(silos), l2)

    @classmethod
    def tuned(cls, silos: dict[str, Silo], validation_ndcg: Callable[["EASE"], float],
              l2_grid: tuple[float, ...] = (30.0, 100.0, 300.0, 1000.0, 3000.0)) -> "EASE":
        """λ with the best validation NDCG@10, fitted on training baskets only."""
        gram = gram_matrix(silos)
        best, best_score = None, -np.inf
        for l2 in l2_grid:
            candidate = cls(gram, l2)
            score = validation_ndcg(candidate)
            if best is None or score > best_score:     # NaN (no validation users) keeps the first λ
                best, best_score = candidate, score
        return best


def gram_matrix(silos: dict[str, Silo]) -> np.ndarray:
    matrix = interaction_matrix(silos)
    return np.asarray((matrix.T @ matrix).todense(), dtype=np.float64)


class ZeroShot:
    """The pretrained encoder alone: the age-weighted mean of the history's item text vectors,
    by cosine against every item's text vector. What the text brings before any training."""

    def __init__(self, item_text: np.ndarray):
        self.item_text = item_text

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        return weighted_histories(cases, len(self.item_text)) @ self.item_text @ self.item_text.T


class TeacherRanker:
    """The teacher: user tower over the history, against every item's vector and bias."""

    def __init__(self, teacher, batch_size: int = 1024):
        self.teacher, self.batch_size = teacher, batch_size
        self.items = teacher.item_matrix()

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        out = []
        for start in range(0, len(cases), self.batch_size):
            part = cases[start:start + self.batch_size]
            users = self.teacher.encode_histories([(c.history, c.ages) for c in part])
            out.append((self.teacher.user_matrix(users) @ self.items.T).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.items)))
