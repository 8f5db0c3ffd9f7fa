"""Issue 2 benchmark: every model per region on the full Online Retail test users (CPU).

Baselines, the zero-shot encoder, the central teacher (all regions pooled, non-private upper
bound) and each region trained alone (lower bound). Usage: python bench/foundation.py [epochs]
"""

from __future__ import annotations

import sys

import torch

from common import WORK, save, silos_dir
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import build_rankers, evaluate_ranker, format_report
from fedrec.evaluation.rankers import EncoderRanker
from fedrec.model.teacher import Teacher
from fedrec.training.trainer import fit


def main(epochs: int = 4) -> None:
    silos = load_dataset(silos_dir())
    catalog = silos["uk"].catalog
    config = FedrecConfig.from_flat({"train.epochs": epochs, "train.samples_per_user": 2,
                                     "train.patience": 1})
    report = {name: evaluate_ranker(r, silos) for name, r in build_rankers(silos, []).items()}
    print(format_report(report), flush=True)
    training = {}
    for label, regions in [("central teacher", list(silos)), *[(f"{r} alone", [r]) for r in silos]]:
        torch.manual_seed(0)
        teacher = Teacher(config.model)
        part = {r: silos[r] for r in regions}
        result = fit(teacher, part, config, WORK / "checkpoints" / label.replace(" ", "-"))
        report[label] = evaluate_ranker(EncoderRanker(teacher, catalog, config.model.context_items), part)
        training[label] = {"best_epoch": result.best_epoch,
                           "epochs_run": len(result.history),
                           "epoch_seconds": [h["epoch_seconds"] for h in result.history],
                           "val_ndcg@10": [h["val"]["overall"]["ndcg@10"] for h in result.history]}
        print(format_report({label: report[label]}), flush=True)
    save("foundation", {"config": config.to_flat(), "test": report, "training": training})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
