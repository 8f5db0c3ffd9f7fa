"""What the federation gives a small region: eu trained alone under DP (`fedrec train --dp`) with the
demo's settings and budget, beside eu's share of the demo's federated DP teacher.

    fedrec demo && python bench/eu_alone.py [runs/demo] [repeats]     → results/eu_alone.json

Each repeat of eu alone spends from its own fresh ledger in runs/bench (a what-if: in a deployment
it would spend from the one beside its silo, which the demo has already spent). DP draws fresh
noise each repeat, so repeats differ by their noise. The federated teacher is the demo's one run.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import WORK, save, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.federation.region import RegionSettings, train_alone
from fedrec.model.teacher import Teacher
from fedrec.privacy.budget import RegionBudget
from fedrec.tools.demo import DEMO_SETTINGS

EPSILON, DELTA = 8.0, 1e-5


def main(demo: str = "runs/demo", repeats: str = "3") -> None:
    demo_dir = Path(demo)
    silos = load_dataset(demo_dir / "silos", ["eu"])
    catalog = silos["eu"].catalog
    config = FedrecConfig.from_flat(DEMO_SETTINGS)
    alone, seconds = [], []
    for repeat in range(int(repeats)):
        out, state = WORK / f"eu-alone-dp-{repeat}", WORK / f"eu-alone-dp-{repeat}-records"
        for folder in (out, state):
            shutil.rmtree(folder, ignore_errors=True)
        settings = RegionSettings("eu", str(demo_dir / "silos" / "eu"), str(state),
                                  RegionBudget(epsilon=EPSILON, delta=DELTA))
        started = time.perf_counter()
        train_alone(settings, config, out)
        seconds.append(time.perf_counter() - started)
        alone.append(evaluate_ranker(TeacherRanker(Teacher.load(out, catalog)), silos)["eu"])
    federated = evaluate_ranker(TeacherRanker(Teacher.load(demo_dir / "federated-run" / "final", catalog)), silos)["eu"]
    ndcg = [r["ndcg@10"] for r in alone]
    save("eu_alone", {"settings": DEMO_SETTINGS, "epsilon": EPSILON, "delta": DELTA, "train_seconds": seconds,
                      "eu_alone_test": alone, "federated_eu_test": federated,
                      "summary": {"eu_alone_ndcg@10": {"mean": float(np.mean(ndcg)), "min": min(ndcg), "max": max(ndcg)},
                                  "federated_eu_ndcg@10": federated["ndcg@10"],
                                  "federated_over_alone_mean": federated["ndcg@10"] / float(np.mean(ndcg))}})


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
