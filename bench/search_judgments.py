"""A judged query set made from the Online Retail catalog alone, as a judgments CSV that
`fedrec search-eval` reads like any user's. Online Retail has no search log, so the queries are
made up, the same way every time:

    query   1–3 consecutive words of a sampled item's title, lower-cased (`evaluation.search`)
    3       the item the query came from
    2       every other item whose title holds all the query's words
    1       every other item of the source's product type (its title's last word: MUG, BAG, HOLDER…)
    0       ten random items sharing no word with the query (judged negatives for re-ranking)

Words are runs of two or more letters or digits, compared lower-cased. Fragments of titles favour
lexical matching by construction (grades 3 and 2 are word matches), so this set says whether
hybrid search keeps what BM25 finds; it says little about semantic search.

    python bench/search_judgments.py SILOS OUT.csv [QUERIES]
"""

from __future__ import annotations

import csv
import re
import sys

import numpy as np

from fedrec.data.silo import Catalog
from fedrec.evaluation.search import fragment_queries

NEGATIVES = 10


def words(text: str) -> set[str]:
    return set(re.findall(r"\w\w+", text.lower()))


def judged_rows(catalog: Catalog, count: int, seed: int = 0) -> list[tuple[str, str, int]]:
    rng = np.random.default_rng(seed)
    titles = [words(t) for t in catalog.titles]
    kind = [t.split()[-1].lower() if t.split() else "" for t in catalog.titles]
    rows, seen = [], set()
    queries, sources = fragment_queries(catalog, count, seed)
    for query, source in zip(queries, sources):
        wanted = words(query)
        if not wanted or query in seen:
            continue
        seen.add(query)
        grade = {int(source): 3}
        for item, title in enumerate(titles):
            if item not in grade and wanted <= title:
                grade[item] = 2
        for item in np.flatnonzero(np.array(kind) == kind[source]):
            grade.setdefault(int(item), 1)
        unrelated = [i for i, title in enumerate(titles) if not wanted & title and i not in grade]
        for item in rng.choice(unrelated, min(NEGATIVES, len(unrelated)), replace=False):
            grade[int(item)] = 0
        rows += [(query, catalog.item_ids[item], relevance) for item, relevance in grade.items()]
    return rows


def main(silos: str, out: str, count: str = "500") -> None:
    rows = judged_rows(Catalog.load(f"{silos}/catalog.parquet"), int(count))
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "item_id", "relevance"])
        writer.writerows(rows)
    print(f"wrote {out}: {len({r[0] for r in rows})} queries, {len(rows)} judged pairs")


if __name__ == "__main__":
    main(*sys.argv[1:])
