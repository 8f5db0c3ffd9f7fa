"""A bundle as a `Ranker`, through the edge runtime's public API only (`EdgeModel.recommend_batch`),
so the number a bundle gets is what an app calling it would see."""

from __future__ import annotations

import numpy as np

from fedrec.data.silo import Catalog
from fedrec.edge_runtime import EdgeModel
from fedrec.evaluation.rankers import EvalCase

DEPTH = 100     # ranks kept per user: NDCG/Recall@10 and @20 are exact, MRR counts a first hit below as 0


class BundleRanker:
    def __init__(self, model: EdgeModel, catalog: Catalog, batch_size: int = 256):
        self.model, self.catalog, self.batch_size = model, catalog, batch_size

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        out = np.full((len(cases), len(self.catalog)), -np.inf)
        for start in range(0, len(cases), self.batch_size):
            part = cases[start:start + self.batch_size]
            results = self.model.recommend_batch([[self.catalog.item_ids[i] for i in c.history] for c in part], DEPTH,
                                                 ages=[c.ages.tolist() for c in part])
            for row, ranked in enumerate(results, start):
                positions = [self.catalog.index[r.item_id] for r in ranked]
                out[row, positions] = DEPTH - np.arange(len(positions))
        return out
