"""Hybrid retrieval: one ranking from the dense (model) and lexical (BM25) scores of every item.

convex  (1 − w) · dense + w · lexical, each min-max normalised over the catalog per query (a
        query matching no word has all-zero lexical scores, which normalise to zero), w = parameter
rrf     reciprocal-rank fusion: 1 / (k + dense rank) + 1 / (k + lexical rank), k = parameter; only
        items that share a word with the query get the lexical term
Ranks are 1-based, by score descending, ties by catalog position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("convex", "rrf")


@dataclass(frozen=True)
class Fusion:
    method: str
    parameter: float

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown fusion {self.method!r}; choose {' or '.join(METHODS)}")
        if self.method == "convex" and not 0 <= self.parameter <= 1:
            raise ValueError(f"a convex fusion's lexical weight must be in [0, 1], got {self.parameter}")
        if self.method == "rrf" and not self.parameter > 0:
            raise ValueError(f"a reciprocal-rank fusion's k must be > 0, got {self.parameter}")

    @classmethod
    def parse(cls, text: str) -> Fusion:
        """`convex:0.3` or `rrf:60`."""
        method, _, parameter = text.partition(":")
        try:
            return cls(method.strip(), float(parameter))
        except ValueError as exc:
            raise ValueError(f"fusion {text!r}: {exc}; write convex:W (0 ≤ W ≤ 1) or rrf:K (K > 0)") from None

    def __str__(self) -> str:
        return f"{self.method}:{self.parameter:g}"

    def scores(self, dense: np.ndarray, lexical: np.ndarray) -> np.ndarray:
        """queries × items fused scores from two queries × items score matrices."""
        if self.method == "convex":
            return (1 - self.parameter) * normalised(dense) + self.parameter * normalised(lexical)
        return 1 / (self.parameter + ranks(dense)) + (lexical > 0) / (self.parameter + ranks(lexical))


# What `fedrec export` records unless told otherwise: the best of `fedrec search-eval --tune-share`'s
# candidates on the Online Retail fragment set's set-aside queries, for the teacher and the student
# bundle alike (BENCHMARKS.md, search evaluation); every convex weight from 0.3 to 0.9 beat every RRF k.
DEFAULT_FUSION = Fusion("convex", 0.6)


def normalised(scores: np.ndarray) -> np.ndarray:
    low, high = scores.min(1, keepdims=True), scores.max(1, keepdims=True)
    return (scores - low) / np.where(high > low, high - low, 1)


def ranks(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    out = np.empty(scores.shape, dtype=np.float32)
    np.put_along_axis(out, order, np.arange(1, scores.shape[1] + 1, dtype=np.float32)[None, :], 1)
    return out
