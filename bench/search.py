"""Search sanity on the full Online Retail catalog (title fragments as queries, `evaluation.search`):
the zero-shot encoder against the trained teacher at several behaviour weights λ
(model.search_behaviour; 0 = text similarity alone).

    python bench/search.py TEACHER_CHECKPOINT      → results/search.json
"""

from __future__ import annotations

import sys

from common import save, silos_dir, show_progress
from fedrec.data.silo import load_dataset
from fedrec.evaluation.search import search_sanity
from fedrec.model.teacher import Teacher

WEIGHTS = (0.0, 0.1, 0.3, 1.0)


def main(teacher_dir: str) -> None:
    catalog = load_dataset(silos_dir())["uk"].catalog
    teacher = Teacher.load(teacher_dir, catalog)
    items = teacher.item_matrix()
    results = {"zero-shot encoder": search_sanity(
        lambda q, k: (teacher.text_vectors(teacher.encoder.encode_queries(list(q))) @ teacher.tower.text.T)
        .topk(k).indices.tolist(), catalog)}
    for weight in WEIGHTS:
        teacher.config.search_behaviour = weight
        results[f"teacher, λ = {weight:g}"] = search_sanity(
            lambda q, k: (teacher.encode_queries(list(q)) @ items.T).topk(k).indices.tolist(), catalog)
        print(weight, results[f"teacher, λ = {weight:g}"], flush=True)
    save("search", {"teacher": teacher_dir, "search_sanity": results})


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
