"""Issues 3 and 4 benchmarks on the full Online Retail silos (CPU, real loopback Flower).

    python bench/federation.py fed        federated non-private teacher (→ results/federation.json)
    python bench/federation.py dp 1 3 8   federated DP at each ε per region (→ results/privacy.json)

Each run is evaluated on every test user with the same harness as bench/foundation.py, whose
central and region-alone numbers the tables in BENCHMARKS.md sit next to.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from common import RESULTS, WORK, save, silos_dir
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import EncoderRanker
from fedrec.federation.launch import simulate
from fedrec.model.teacher import Teacher
from fedrec.privacy.budget import RegionBudget

SETTINGS = {"federation.rounds": 2, "federation.local_epochs": 0.5, "federation.evaluate_every": 0}


def federated_run(name: str, budgets: dict[str, RegionBudget]) -> dict:
    data = silos_dir()
    silos = load_dataset(data)
    config = FedrecConfig.from_flat(SETTINGS)
    run_dir = WORK / name
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    history = simulate(data, sorted(silos), run_dir, config, budgets, tls=True)
    wall = time.perf_counter() - started
    teacher = Teacher.load(run_dir / "final")
    test = evaluate_ranker(EncoderRanker(teacher, silos["uk"].catalog, config.model.context_items), silos)
    counts = teacher.parameter_counts()
    return {
        "config": config.to_flat(), "wall_seconds": wall,
        "round_seconds": [r["seconds"] for r in history],
        "bytes_per_region_per_round": {r: m["bytes_sent"] for r, m in history[-1]["regions"].items()},
        "teacher_bytes": counts["total"] * 4, "adapter_parameters": counts["adapters"],
        "epsilon": {r: m.get("epsilon") for r, m in history[-1]["regions"].items()},
        "declined": [r["declined"] for r in history],
        "test": test,
    }


def dp_step_ratio(batch: int = 32, steps: int = 6) -> dict:
    """Seconds per DP-SGD step ÷ seconds per plain step, same batch, same teacher (MiniLM)."""
    from fedrec.privacy.dp_sgd import DPPlan, train_private
    from fedrec.training.objective import RetrievalObjective, can_train
    from fedrec.training.trainer import make_optimizer, train_epochs

    silos = load_dataset(silos_dir(), ["eu"])
    users = [u for u in silos["eu"].users if can_train(u)][: batch * steps]
    config = FedrecConfig.from_flat({"train.batch_size": batch})
    torch.manual_seed(0)
    objective = RetrievalObjective(Teacher(config.model), silos["eu"].catalog)
    objective.refresh_catalog()
    config.train.refresh_catalog_every = 10 ** 9           # time the steps, not the refresh
    timings = {}
    for kind in ("plain", "dp", "plain", "dp"):
        started = time.perf_counter()
        if kind == "plain":
            train_epochs(objective, make_optimizer(objective, config.train), users, config.train, 1,
                         np.random.default_rng(0))
        else:
            train_private(objective, users, config.train, DPPlan(len(users), batch / len(users), steps, 1.0, 1.0))
        timings.setdefault(kind, []).append((time.perf_counter() - started) / steps)
    plain, dp = min(timings["plain"]), min(timings["dp"])
    return {"batch": batch, "plain_step_seconds": plain, "dp_step_seconds": dp, "ratio": dp / plain}


def main(mode: str, *epsilons: str) -> None:
    regions = ["eu", "row", "uk"]
    if mode == "fed":
        save("federation", {"federated": federated_run("federated", {r: RegionBudget(enabled=False) for r in regions})})
    elif mode == "dp":
        runs = {}
        for eps in map(float, epsilons):
            budgets = {r: RegionBudget(epsilon=eps, delta=1e-5) for r in regions}
            runs[f"epsilon={eps:g}"] = federated_run(f"dp-eps{eps:g}", budgets)
            save("privacy", {"runs": runs, "delta": 1e-5})
        save("privacy", {"runs": runs, "delta": 1e-5, "step_time": dp_step_ratio()})
        plot()
    else:
        raise SystemExit(__doc__)


def plot() -> None:
    """Privacy–utility: test NDCG@10 per region against ε, next to the non-private references."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    privacy = json.loads((RESULTS / "privacy.json").read_text())
    references = {}
    for name, key in (("federation", "federated"),):
        path = RESULTS / f"{name}.json"
        if path.exists():
            references["federated non-private"] = json.loads(path.read_text())[key]["test"]
    foundation = RESULTS / "foundation.json"
    if foundation.exists():
        references["central non-private"] = json.loads(foundation.read_text())["test"]["central teacher"]
    eps = sorted(float(k.split("=")[1]) for k in privacy["runs"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, region in enumerate(["uk", "eu", "row", "overall"]):
        values = [privacy["runs"][f"epsilon={e:g}"]["test"][region]["ndcg@10"] for e in eps]
        ax.plot(eps, values, marker="o", color=f"C{i}", label=f"{region}: federated DP")
        for style, (label, ref) in zip((":", "--"), references.items()):
            ax.axhline(ref[region]["ndcg@10"], color=f"C{i}", linestyle=style, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("ε per region (δ = 1e-5)")
    ax.set_ylabel("test NDCG@10")
    ax.set_title("privacy–utility (dotted: federated non-private, dashed: central)")
    ax.legend(fontsize=8)
    fig.savefig(RESULTS / "privacy_utility.png", dpi=110, bbox_inches="tight")
    print(f"wrote {RESULTS / 'privacy_utility.png'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
