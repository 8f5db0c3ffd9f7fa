"""Edge latency (CPU, one thread): `recommend` for a test user's last 10 items and `search` for a
title fragment, through the bundle (ONNX Runtime FP32 and INT8) and the teacher in torch eager.

    python bench/edge.py BUNDLE TEACHER_CHECKPOINT      → results/edge.json

The variants run in rotating blocks of 25 calls over the same inputs, five passes: this machine
shares its host and its speed drifts from minute to minute, so neighbours' bursts land on every
variant alike. p50 and p99 are medians over the passes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import save, silos_dir, show_progress
from fedrec.data.silo import load_dataset
from fedrec.edge_runtime import EdgeModel
from fedrec.evaluation.search import fragment_queries
from fedrec.model.teacher import Teacher

PASSES, BLOCK = 5, 25


def timed_together(calls: dict, inputs: list) -> dict:
    seconds = {name: [] for name in calls}
    for start in range(0, len(inputs), BLOCK):
        chunk = inputs[start:start + BLOCK]
        for name, call in calls.items():
            call(chunk[0])
            for x in chunk:
                started = time.perf_counter()
                call(x)
                seconds[name].append(time.perf_counter() - started)
    return {name: (float(np.percentile(s, 50)) * 1000, float(np.percentile(s, 99)) * 1000) for name, s in seconds.items()}


def main(bundle: str, teacher_dir: str) -> None:
    torch.set_num_threads(1)
    silos = load_dataset(silos_dir())
    catalog = silos["uk"].catalog
    users = [u for s in silos.values() for u in s.eval_users("test")][:300]
    cases = [u.eval_case("test") for u in users]
    histories = [([catalog.item_ids[i] for i in c[0][:10]], c[1][:10].tolist()) for c in cases]
    queries, _ = fragment_queries(catalog, 300)
    teacher = Teacher.load(teacher_dir, catalog).eval()
    items = teacher.item_matrix()

    def teacher_recommend(history):
        positions = np.array([catalog.index[i] for i in history[0]])
        with torch.no_grad():
            (teacher.user_matrix(teacher.encode_histories([(positions, np.array(history[1]))])) @ items.T).topk(10)

    def teacher_search(query):
        with torch.no_grad():
            (teacher.encode_queries([query]) @ items.T).topk(10)

    recommend, search = {"teacher torch eager": teacher_recommend}, {"teacher torch eager": teacher_search}
    for precision in ("fp32", "int8"):
        model = EdgeModel(bundle, precision, threads=1)
        recommend[f"bundle ORT {precision}"] = lambda h, m=model: m.recommend(h[0], 10, ages=h[1])
        search[f"bundle ORT {precision}"] = lambda q, m=model: m.search(q, 10, mode="dense")   # the model, as the teacher
    out = {}
    for task, calls, inputs in (("recommend", recommend, histories), ("search", search, queries)):
        passes = [timed_together(calls, inputs) for _ in range(PASSES)]
        out[task] = {name: {"p50_ms": float(np.median([p[name][0] for p in passes])),
                            "p99_ms": float(np.median([p[name][1] for p in passes])),
                            "p50_ms_per_pass": [p[name][0] for p in passes]} for name in calls}
        print(task, {k: round(v["p50_ms"], 3) for k, v in out[task].items()}, flush=True)
    sizes = {f: info["bytes"] for f, info in json.loads((Path(bundle) / "manifest.json").read_text())["files"].items()}
    save("edge", {"latency_one_thread": out, "bundle_bytes": sizes, "calls_per_pass": len(histories),
                  "passes": PASSES})


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
