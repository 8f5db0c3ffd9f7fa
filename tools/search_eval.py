"""`fedrec search-eval`: how well a bundle searches judged queries, in each search mode.

Judgments are a table (CSV, Parquet or XLSX) of `query,item_id,relevance`: graded relevance, a
whole number ≥ 0, 0 = judged not relevant, unjudged items count as 0. Rows naming an item the
bundle's catalog lacks are skipped and counted (the report says how many, and which ids); a query
left with no relevant (≥ 1) item is skipped and named. Each mode (dense, lexical, hybrid) is
measured twice: ranking the full catalog, and re-ranking only each query's judged items.

With `tune_share`, that share of the queries (chosen by a hash of the query text, so the same
queries every run) is set aside to compare fusions (`edge_runtime.fusion`) and the rest is
evaluated; the best fusion is reported, for `fedrec export --fusion`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedrec.data.sources import fail_at, no_empty, parse_numbers, read_table, require_columns
from fedrec.edge_runtime.fusion import Fusion
from fedrec.edge_runtime.runtime import SEARCH_MODES, EdgeModel
from fedrec.errors import DataError
from fedrec.evaluation.metrics import graded_metrics

VIEWS = ("full_catalog", "rerank_judged")
CANDIDATES = tuple(Fusion("convex", w / 10) for w in range(1, 10)) + \
             tuple(Fusion("rrf", k) for k in (5, 10, 20, 40, 60, 100))
BATCH = 64


@dataclass(frozen=True)
class Judgments:
    queries: list[str]
    items: list[np.ndarray]             # each query's judged items, as catalog positions
    relevance: list[np.ndarray]         # and their grades
    rows: int
    unknown_rows: int                   # rows skipped: their item is not in the catalog
    unknown_ids: list[str]
    without_relevant: list[str]         # queries skipped: no relevant item in the catalog


def read_judgments(path: str | Path, position: dict[str, int]) -> Judgments:
    """The judged queries in `path` against a catalog (`position`: item id → catalog position).
    A bad value raises DataError naming the file, the data row (1-based) and the column."""
    file = str(path)
    raw = read_table(path)
    require_columns(raw, ["query", "item_id", "relevance"], file)
    frame = pd.DataFrame({"query": raw["query"].astype(str).str.strip(),
                          "item_id": raw["item_id"].astype(str).str.strip()})
    no_empty(frame, "query", "query", file)
    no_empty(frame, "item_id", "item_id", file)
    relevance = parse_numbers(raw, "relevance", file, integer=True)
    fail_at(relevance < 0, raw, "relevance", file, "a negative relevance (0 = judged not relevant)")
    fail_at(frame.duplicated(["query", "item_id"]), frame, "item_id", file,
             "this (query, item_id) pair is judged in an earlier row too")
    frame["relevance"] = relevance.astype("int64")
    known = frame["item_id"].isin(position.keys())
    if not known.any():
        raise DataError(f"none of the {len(frame)} judged item ids is in the bundle's catalog", file=file,
                        column="item_id", hint="Judge items of the catalog the bundle was exported with.")
    queries, items, grades, without = [], [], [], []
    for query, rows in frame.assign(known=known).groupby("query", sort=False):
        rows = rows[rows["known"]]
        if (rows["relevance"] > 0).any():
            queries.append(query)
            items.append(np.array([position[i] for i in rows["item_id"]], dtype=np.int64))
            grades.append(rows["relevance"].to_numpy(dtype=np.int64))
        else:
            without.append(query)
    if not queries:
        raise DataError("no query has a relevant (relevance ≥ 1) item of the bundle's catalog", file=file,
                        column="relevance")
    return Judgments(queries, items, grades, len(frame), int((~known).sum()),
                     sorted(set(frame.loc[~known, "item_id"])), without)


def in_tuning_share(query: str, share: float) -> bool:
    return int.from_bytes(hashlib.sha256(query.encode()).digest()[:4], "big") < share * 2 ** 32


def query_metrics(scores: np.ndarray, items: np.ndarray, relevance: np.ndarray, k: int) -> dict[str, dict]:
    """Both views of one query's scores: the whole catalog ranked, and its judged items re-ranked
    (by score descending, ties by catalog position, in both)."""
    ranked = np.lexsort((np.arange(len(scores)), -scores))
    judged = items[np.lexsort((items, -scores[items]))]
    return {"full_catalog": graded_metrics(ranked, items, relevance, k),
            "rerank_judged": graded_metrics(judged, items, relevance, k)}


def mean(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}


def search_eval(model: EdgeModel, judgments: Judgments, k: int = 10, tune_share: float = 0.0,
                progress: bool = True) -> dict:
    """The report: mean metrics per view and mode over the evaluated queries, per-query results,
    what was skipped, and (with `tune_share`) the fusions compared on the set-aside queries."""
    tuning = [in_tuning_share(q, tune_share) for q in judgments.queries]
    if tune_share and (all(tuning) or not any(tuning)):
        left = "no query to evaluate" if all(tuning) else "no query to tune on"
        raise DataError(f"a tuning share of {tune_share:g} leaves {left} among {len(tuning)}; "
                        "judge more queries or change the share")
    per_query, sweep = [], {str(f): [] for f in CANDIDATES}
    alone = {"dense": [], "lexical": []}                # on the tuning queries, for reference
    bar = tqdm(total=len(judgments.queries), desc="search-eval", unit="query", disable=not progress)
    for start in range(0, len(judgments.queries), BATCH):
        chunk = slice(start, start + BATCH)
        queries = judgments.queries[chunk]
        dense, lexical = model.dense_scores(queries), model.lexical.scores(queries)
        by_mode = {"dense": dense, "lexical": lexical, "hybrid": model.fusion.scores(dense, lexical)}
        for row, (query, items, grades, tunes) in enumerate(zip(queries, judgments.items[chunk],
                                                                judgments.relevance[chunk], tuning[chunk])):
            if tunes:
                for mode, values in alone.items():
                    values.append(query_metrics(by_mode[mode][row], items, grades, k)["full_catalog"][f"ndcg@{k}"])
                for fusion in CANDIDATES:
                    scores = fusion.scores(dense[row:row + 1], lexical[row:row + 1])[0]
                    sweep[str(fusion)].append(query_metrics(scores, items, grades, k)["full_catalog"][f"ndcg@{k}"])
                continue
            results = {mode: query_metrics(by_mode[mode][row], items, grades, k) for mode in SEARCH_MODES}
            per_query.append({"query": query, "judged": len(items), "relevant": int((grades > 0).sum()),
                              **{view: {mode: results[mode][view] for mode in SEARCH_MODES} for view in VIEWS}})
        bar.update(len(queries))
    bar.close()
    report = {
        "judged_rows": judgments.rows, "queries": len(per_query), "k": k,
        "gains": "2^relevance - 1 (NDCG); relevant = relevance >= 1 (Recall, MRR)",
        "fusion": str(model.fusion),
        "skipped": {"rows_with_unknown_items": judgments.unknown_rows, "unknown_item_ids": judgments.unknown_ids,
                    "queries_without_relevant_items": judgments.without_relevant},
        **{view: {mode: mean([q[view][mode] for q in per_query]) for mode in SEARCH_MODES} for view in VIEWS},
    }
    if tune_share:
        means = {name: float(np.mean(values)) for name, values in sweep.items()}
        report["tuning"] = {"share": tune_share, "queries": sum(tuning), f"ndcg@{k}": means,
                            "best": max(means, key=means.get),
                            f"ndcg@{k}_alone": {mode: float(np.mean(values)) for mode, values in alone.items()}}
    return report | {"per_query": per_query}
