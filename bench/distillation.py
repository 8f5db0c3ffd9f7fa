"""Distillation and export on the full Online Retail data (CPU), for a trained teacher checkpoint.

    python bench/distillation.py TEACHER_CHECKPOINT      → results/distillation.json

The bundle recommends with the teacher's own tower and item vectors, so what distillation can lose
is in text: search queries, and items that arrive after export (encoded by the student). Both are
measured, and the bundle itself is scored through the runtime's public API.
"""

from __future__ import annotations

import copy
import sys

from common import WORK, save, silos_dir, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.distill.distill import distill
from fedrec.model.student import Student
from fedrec.edge_runtime import EdgeModel
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.evaluation.search import search_sanity
from fedrec.export.bundle import export_bundle
from fedrec.model.teacher import Teacher
from fedrec.tools.bundle_eval import BundleRanker
from quality import teacher_search


def bundle_search(edge: EdgeModel, catalog):
    """The student's own search (dense): what distillation retains, not the lexical index beside it."""
    def top_k(queries, k):
        return [[catalog.index[r.item_id] for r in results] for results in edge.search_batch(list(queries), k, mode="dense")]
    return top_k


def main(teacher_dir: str) -> None:
    silos = load_dataset(silos_dir())
    catalog = silos["uk"].catalog
    teacher = Teacher.load(teacher_dir, catalog)
    config = FedrecConfig()
    student, result = distill(teacher, teacher_dir, config, WORK / "student")
    bundle = export_bundle(WORK / "student", catalog, WORK / "bundles" / "student")
    test = {"teacher": evaluate_ranker(TeacherRanker(teacher), silos)}
    search = {"teacher": search_sanity(teacher_search(teacher), catalog)}
    for precision in ("fp32", "int8"):
        edge = EdgeModel(bundle, precision)
        test[f"bundle {precision} (runtime API)"] = evaluate_ranker(BundleRanker(edge, catalog), silos)
        search[f"bundle {precision}"] = search_sanity(bundle_search(edge, catalog), catalog)
    cold = copy.deepcopy(teacher)
    cold.use_text_encoder(Student.load(WORK / "student"))
    test["teacher, every item's text from the student"] = evaluate_ranker(TeacherRanker(cold), silos)
    reference = test["teacher"]["overall"]["ndcg@10"]
    save("distillation", {
        "config": {k: v for k, v in config.to_flat().items() if k.startswith("distill.")},
        "student_parameters": student.parameter_count(),
        "teacher_encoder_parameters": teacher.parameter_counts()["encoder"],
        "seconds": result.seconds, "best_epoch": result.best_epoch, "validation": result.validation,
        "test": test, "search_sanity": search,
        "ndcg@10_retention": {k: v["overall"]["ndcg@10"] / reference for k, v in test.items()},
        "search_source@10_retention": {k: v["source@10"] / search["teacher"]["source@10"] for k, v in search.items()},
    })


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
