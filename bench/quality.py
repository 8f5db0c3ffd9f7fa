"""Recommendation quality on the full Online Retail data (CPU): the non-private teacher beside the
peers a retailer could run instead, its ablations, the cold-start slice and search sanity.

    python bench/quality.py [seeds]       → results/quality.json

Every model is ranked by the same harness on the same next-basket split. The peers pool every
region's training baskets: they are non-private references, as is the central teacher.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from common import save, silos_dir, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import build_rankers, cold_items, evaluate_ranker, format_report
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.evaluation.search import search_sanity
from fedrec.model.teacher import Teacher
from fedrec.training.trainer import fit

VARIANTS = {"teacher (text + item ids)": {}, "text only": {"model.item_ids": False},
            "item ids only": {"model.item_text": False}}


def teacher_search(teacher: Teacher):
    items = teacher.item_matrix()

    def top_k(queries, k):
        return (teacher.encode_queries(list(queries)) @ items.T).topk(k).indices.tolist()
    return top_k


def zero_shot_search(teacher: Teacher):
    def top_k(queries, k):
        text = teacher.text_vectors(teacher.encoder.encode_queries(list(queries)))
        return (text @ teacher.tower.text.T).topk(k).indices.tolist()
    return top_k


def main(seeds: int = 3) -> None:
    silos = load_dataset(silos_dir())
    catalog = silos["uk"].catalog
    cold = cold_items(silos)
    peers = build_rankers(silos, [])
    report = {name: evaluate_ranker(r, silos) for name, r in peers.items()}
    cold_report = {name: evaluate_ranker(r, silos, targets=cold) for name, r in peers.items()}
    print(format_report(report), flush=True)
    runs, search = {}, {}
    for label, overrides in VARIANTS.items():
        for seed in range(seeds if label.startswith("teacher") else 1):
            config = FedrecConfig.from_flat({**overrides, "train.seed": seed})
            torch.manual_seed(seed)
            teacher = Teacher(config.model, catalog)
            started = time.perf_counter()
            result = fit(teacher, silos, config)
            name = f"{label} seed {seed}"
            ranker = TeacherRanker(teacher)
            report[name], cold_report[name] = evaluate_ranker(ranker, silos), evaluate_ranker(ranker, silos, targets=cold)
            runs[name] = {"seconds": time.perf_counter() - started, "best_epoch": result.best_epoch,
                          "epoch_seconds": [h["epoch_seconds"] for h in result.history],
                          "val_ndcg@10": [h["val"]["overall"]["ndcg@10"] for h in result.history],
                          "parameters": teacher.parameter_counts()}
            if seed == 0 and label.startswith("teacher"):
                search["zero-shot encoder"] = search_sanity(zero_shot_search(teacher), catalog)
                search[label] = search_sanity(teacher_search(teacher), catalog)
                teacher.save(silos_dir().parent / "checkpoints" / "central")
            print(format_report({name: report[name]}), flush=True)
    seeded = [report[f"{next(iter(VARIANTS))} seed {s}"]["overall"]["ndcg@10"] for s in range(seeds)]
    save("quality", {"config": FedrecConfig().to_flat(), "test": report, "cold_start": cold_report,
                     "cold_items": int(cold.sum()), "search_sanity": search, "training": runs,
                     "teacher_ndcg@10": {"mean": float(np.mean(seeded)), "min": min(seeded), "max": max(seeded)}})


if __name__ == "__main__":
    show_progress()
    main(*(int(a) for a in sys.argv[1:]))
