"""Ranking metrics over the FULL catalog, against a user's whole target basket.

Order is by score descending, ties broken by item index, the same for top-k and for ranks.
Recall@k = hits in the top k ÷ min(k, |targets|); NDCG@k uses binary gains and the ideal
ranking of min(k, |targets|) hits; MRR is 1 ÷ rank of the first target in the full ranking.
"""

from __future__ import annotations

import numpy as np

KS = (10, 20)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("recall", "ndcg")) + ("mrr",)


def rank_metrics(scores: np.ndarray, targets: list[np.ndarray], exclude: list[np.ndarray],
                 ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """Per-user metrics. `scores` is users × items; excluded items never rank."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    n_users, n_items = scores.shape
    for u, items in enumerate(exclude):
        scores[u, items] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n_items), scores.shape), -scores), axis=1)
    top = order[:, : max(ks)]
    out = {f"{m}@{k}": np.zeros(n_users) for k in ks for m in ("recall", "ndcg")}
    out["mrr"] = np.zeros(n_users)
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    for u, target in enumerate(targets):
        target = np.asarray(target)
        hit = np.isin(top[u], target)
        for k in ks:
            ideal = discounts[: min(k, len(target))].sum()
            out[f"recall@{k}"][u] = hit[:k].sum() / min(k, len(target))
            out[f"ndcg@{k}"][u] = (discounts[:k] * hit[:k]).sum() / ideal
        out["mrr"][u] = 1.0 / first_rank(scores[u], target)
    return out


def first_rank(scores: np.ndarray, target: np.ndarray) -> int:
    """1-based rank of the best-placed target under (score desc, index asc) order."""
    best = min(target, key=lambda i: (-scores[i], i))
    s = scores[best]
    return int((scores > s).sum() + (scores[:best] == s).sum() + 1)


def graded_metrics(ranked: np.ndarray, items: np.ndarray, relevance: np.ndarray, k: int = 10) -> dict[str, float]:
    """One query's metrics for graded judgments. `ranked`: candidate positions best first (the
    whole catalog, or the judged items when re-ranking); `items`, `relevance`: its judged items and
    their grades (0 = judged not relevant; unjudged items count as 0). NDCG@k gains 2^rel − 1
    against the ideal order of the judged grades; relevant means rel ≥ 1 for Recall@k (÷ min(k,
    relevant), as above) and MRR (1 ÷ rank of the first relevant item in `ranked`, 0 if none)."""
    grade = dict(zip(np.asarray(items).tolist(), np.asarray(relevance).tolist()))
    got = np.array([grade.get(i, 0) for i in np.asarray(ranked).tolist()], dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    top = got[:k]
    ideal = np.sort(np.asarray(relevance, dtype=np.float64))[::-1][:k]
    ideal_dcg = ((2 ** ideal - 1) * discounts[:len(ideal)]).sum()
    relevant = int((np.asarray(relevance) > 0).sum())
    first = np.flatnonzero(got > 0)
    return {f"ndcg@{k}": float(((2 ** top - 1) * discounts[:len(top)]).sum() / ideal_dcg) if ideal_dcg else 0.0,
            f"recall@{k}": float((top > 0).sum() / min(k, relevant)) if relevant else 0.0,
            "mrr": float(1 / (first[0] + 1)) if len(first) else 0.0}
