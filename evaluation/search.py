"""Search sanity on the catalog alone: title fragments as queries (what a shopper might type for an
item), judged by whether the item they came from, or any item whose title holds the fragment, is
found. Made from public data, so it says whether search still works, not how good it is."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fedrec.data.silo import Catalog

TopK = Callable[[Sequence[str], int], list[list[int]]]     # queries, k → catalog positions, best first


def title_fragment(title: str, rng: np.random.Generator) -> str:
    """One to three consecutive words of a title, lower-cased."""
    words = title.lower().split()
    length = int(rng.integers(1, min(3, len(words)) + 1))
    start = int(rng.integers(0, len(words) - length + 1))
    return " ".join(words[start:start + length])


def fragment_queries(catalog: Catalog, count: int = 500, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    sources = rng.choice([i for i, t in enumerate(catalog.titles) if t.split()], count, replace=False)
    return [title_fragment(catalog.titles[i], rng) for i in sources], sources


def search_sanity(top_k: TopK, catalog: Catalog, count: int = 500, k: int = 10, seed: int = 0) -> dict[str, float]:
    """source@k: the query's own item in the top k; match@k: share of the top k whose title holds the
    query's words (all of them, in any order)."""
    queries, sources = fragment_queries(catalog, count, seed)
    found = top_k(queries, k)
    titles = [t.lower() for t in catalog.titles]
    source_hits = [s in row for s, row in zip(sources, found)]
    matches = [np.mean([all(w in titles[i] for w in q.split()) for i in row]) for q, row in zip(queries, found)]
    return {"queries": len(queries), f"source@{k}": float(np.mean(source_hits)), f"match@{k}": float(np.mean(matches))}
