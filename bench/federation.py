"""Federated DP on the full Online Retail silos (CPU, a real loopback Flower deployment with TLS).

    python bench/federation.py [repeats]     → results/federation.json

Each repeat trains the tower federated across eu, row and uk at ε = 8, δ = 1e-5 per region, and
eu alone under the same budget and settings (what eu could do without the federation). DP draws
its sampling and noise from OS entropy, so repeats differ by their noise, not by a seed. Every
model is evaluated on every test user with the harness of bench/quality.py.
"""

from __future__ import annotations

import shutil
import sys
import time

import numpy as np

from common import WORK, save, silos_dir, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.federation.launch import simulate
from fedrec.model.teacher import Teacher
from fedrec.privacy.budget import RegionBudget

SETTINGS = {"federation.rounds": 10, "federation.local_epochs": 2.0, "federation.evaluate_every": 0}
EPSILON, DELTA = 8.0, 1e-5


def dp_run(name: str, regions: list[str]) -> dict:
    data = silos_dir()
    silos = load_dataset(data)
    config = FedrecConfig.from_flat(SETTINGS)
    run_dir = WORK / name
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    # Each experiment is a what-if from a fresh budget, so its records stay in its own folder
    # (a deployment keeps one ledger beside each silo, which is simulate's default).
    history = simulate(data, regions, run_dir, config, {r: RegionBudget(epsilon=EPSILON, delta=DELTA) for r in regions},
                       state_root=run_dir / "regions")
    wall = time.perf_counter() - started
    teacher = Teacher.load(run_dir / "final", silos["uk"].catalog)
    last = history[-1]["regions"]
    return {"regions": regions, "wall_seconds": wall, "round_seconds": [r["seconds"] for r in history],
            "epsilon": {r: m.get("epsilon") for r, m in last.items()},
            "noise_multiplier": {r: m.get("noise_multiplier") for r, m in last.items()},
            "bytes_per_region_per_round": {r: m["bytes_sent"] for r, m in last.items()},
            "test": evaluate_ranker(TeacherRanker(teacher), silos)}


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)), "runs": values}


def main(repeats: int = 3) -> None:
    federated, alone = [], []
    for repeat in range(repeats):
        federated.append(dp_run(f"dp-federated-{repeat}", ["eu", "row", "uk"]))
        alone.append(dp_run(f"dp-eu-alone-{repeat}", ["eu"]))
        save("federation", {
            "settings": SETTINGS, "epsilon": EPSILON, "delta": DELTA, "federated": federated, "eu_alone": alone,
            "summary": {"federated_overall_ndcg@10": spread([r["test"]["overall"]["ndcg@10"] for r in federated]),
                        "federated_eu_ndcg@10": spread([r["test"]["eu"]["ndcg@10"] for r in federated]),
                        "eu_alone_eu_ndcg@10": spread([r["test"]["eu"]["ndcg@10"] for r in alone]),
                        "federated_wall_seconds": spread([r["wall_seconds"] for r in federated])}})


if __name__ == "__main__":
    show_progress()
    main(*(int(a) for a in sys.argv[1:]))
