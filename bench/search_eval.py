"""Judged search evaluation on Online Retail, run as a user runs it, and search latency per mode.

For the central teacher (runs/bench/checkpoints/central over runs/bench/silos) and the demo's
student (runs/demo/student over runs/demo/silos): a judged set from the bundle's own catalog
(`search_judgments.py`), a bundle exported with `fedrec export` (the default fusion), then
`fedrec search-eval --tune-share 0.2` (a fifth of the queries compare the fusions, the rest are
evaluated); then `search` latency per mode on one thread, INT8, 300 title fragments, 5 passes of
rotating blocks (`edge.timed_together`).

    python bench/search_eval.py      → results/search_eval.json
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from threadpoolctl import threadpool_limits

from common import REPO, WORK, save, show_progress
from edge import PASSES, timed_together
from fedrec.edge_runtime import EdgeModel
from fedrec.edge_runtime.runtime import SEARCH_MODES
from fedrec.evaluation.search import fragment_queries
from fedrec.data.silo import Catalog
from search_judgments import main as write_judgments

OUT = WORK / "search"
BUNDLES = {"teacher": (REPO / "runs/bench/checkpoints/central", WORK / "silos"),
           "student": (REPO / "runs/demo/student", REPO / "runs/demo/silos")}
TUNE_SHARE = 0.2


def fedrec(*args) -> None:
    subprocess.run([sys.executable, "-m", "fedrec.tools", *map(str, args)], check=True)


def latency(bundle, catalog: Catalog) -> dict:
    queries, _ = fragment_queries(catalog, 300)
    model = EdgeModel(bundle, "int8", threads=1)
    calls = {mode: (lambda q, m=mode: model.search(q, 10, m)) for mode in SEARCH_MODES}
    with threadpool_limits(1):
        passes = [timed_together(calls, queries) for _ in range(PASSES)]
    return {mode: {"p50_ms": float(np.median([p[mode][0] for p in passes])),
                   "p99_ms": float(np.median([p[mode][1] for p in passes]))} for mode in SEARCH_MODES}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (checkpoint, silos) in BUNDLES.items():
        bundle, judgments, report = OUT / f"{name}-bundle", OUT / f"judgments-{name}.csv", OUT / f"{name}-eval.json"
        if not judgments.is_file():
            write_judgments(str(silos), str(judgments))
        if not (bundle / "manifest.json").is_file():
            fedrec("export", checkpoint, "--out", bundle, "--data", silos)
        fedrec("search-eval", bundle, "--judgments", judgments, "--tune-share", TUNE_SHARE, "--json", report)
        evaluated = json.loads(report.read_text())
        evaluated.pop("per_query")          # kept in runs/bench/search/<name>-eval.json
        results[name] = {"checkpoint": str(checkpoint.relative_to(REPO)), "judgments": str(judgments.relative_to(REPO)),
                         **evaluated, "latency_one_thread_int8": latency(bundle, Catalog.load(silos / "catalog.parquet"))}
        print(name, results[name]["latency_one_thread_int8"], flush=True)
    save("search_eval", {"tune_share": TUNE_SHARE, "bundles": results})


if __name__ == "__main__":
    show_progress()
    main()
