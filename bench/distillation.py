"""Issue 5 benchmark: students of two sizes distilled from the trained teacher, evaluated on
every Online Retail test user next to it (retention = student ÷ teacher), with sizes and time.

    python bench/distillation.py [TEACHER_CHECKPOINT [SIZE ...]]
    (default: the central teacher of bench/foundation.py, every size below)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS, WORK, save, silos_dir
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.distill.distill import distill
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import EncoderRanker
from fedrec.model.teacher import Teacher

BUDGET = {"distill.epochs": 20, "distill.patience": 20}   # the defaults, without early stopping: 22–37 min on 2 cores
SIZES = {f"student-{hidden}x{layers}": {"distill.hidden": hidden, "distill.layers": layers, "distill.heads": hidden // 32,
                                        "distill.intermediate": 4 * hidden, **BUDGET}
         for hidden, layers in ((128, 4), (128, 2), (128, 1))}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(teacher_dir: str = str(WORK / "checkpoints" / "central-teacher"), *sizes: str) -> None:
    silos = load_dataset(silos_dir())
    catalog = silos["uk"].catalog
    teacher = Teacher.load(teacher_dir)
    teacher_test = evaluate_ranker(EncoderRanker(teacher, catalog, teacher.config.context_items), silos)
    teacher_params = teacher.parameter_counts()["total"]
    earlier = json.loads((RESULTS / "distillation.json").read_text()) if (RESULTS / "distillation.json").exists() else {}
    kept = earlier.get("students", {}) if earlier.get("teacher", {}).get("checkpoint") == teacher_dir else {}
    results = {"teacher": {"checkpoint": teacher_dir, "parameters": teacher_params,
                           "bytes_fp32": teacher_params * 4, "test": teacher_test},
               "students": {name: s for name, s in kept.items() if name in SIZES}}   # sizes not rerun stay
    for name in sizes or SIZES:
        overrides = SIZES[name]
        config = FedrecConfig.from_flat(overrides)
        out = WORK / "students" / name
        student, result = distill(teacher, teacher_dir, catalog, config, out)
        test = evaluate_ranker(EncoderRanker(student, catalog, student.config.context_items), silos)
        results["students"][name] = {
            "config": overrides, "parameters": student.parameter_count(),
            "parameter_ratio": student.parameter_count() / teacher_params,
            "checkpoint_bytes": folder_bytes(out), "vocabulary": student.config.vocab_size,
            "distill_seconds": result.seconds, "best_epoch": result.best_epoch, "validation": result.validation,
            "test": test,
            "retention": {r: {m: test[r][m] / teacher_test[r][m] if teacher_test[r][m] else None
                              for m in ("ndcg@10", "recall@10")} for r in test},
        }
        save("distillation", results)


if __name__ == "__main__":
    main(*sys.argv[1:])
