"""What limits the federated DP teacher: one in-process FedAvg run per setting.

    python bench/dp_ablation.py NAME '{"train.dp_shared_scale": 0.1, ...}' [--noise-off] [--decay] [--pca] [--uniform]
        → appends to results/dp_ablation.json

The regions' real round code minus the transport and the ledger (`train_private` on each region's
users from the global tower, example-weighted FedAvg), 10 rounds × 2 expected passes unless the
settings give federation.rounds / federation.local_epochs, ε = 8,
δ = 1e-5 per region, σ derived for the whole run as a region would. It spends no budget: its
"regions" are the benchmark's silos, and nothing it trains is shipped. `--noise-off` keeps Poisson
sampling and clipping but sets σ = 0: **not private**, the diagnostic that says how much of the
gap to the central teacher the noise costs. `--decay` lowers the learning rate over rounds
(cosine). `--pca` starts the text adapter at the catalog texts' top principal directions (public
data, so free in privacy) instead of a random projection. `--uniform` averages the regions with equal
weights instead of by their users (does the example-weighted mean leave eu behind?). Beside the last global tower it also evaluates exponential moving averages of the
globals over rounds (post-processing of DP releases, so free in privacy).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from common import RESULTS, WORK, save, show_progress, silos_dir
from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.model.teacher import Teacher
from fedrec.privacy.accountant import noise_for_budget
from fedrec.privacy.dp_sgd import train_private
from fedrec.privacy.plan import DPPlan, round_shape
from fedrec.training.objective import RetrievalObjective, can_train

ROUNDS, LOCAL_EPOCHS, EPSILON, DELTA = 10, 2.0, 8.0, 1e-5
EMA_DECAYS = (0.5, 0.7, 0.85)


def run(settings: dict, noise_off: bool = False, decay: bool = False, pca: bool = False,
        uniform: bool = False) -> dict:
    silos = load_dataset(silos_dir())
    config = FedrecConfig.from_flat(settings)
    rounds = int(settings.get("federation.rounds", ROUNDS))            # the run's shape: these two settings,
    passes = float(settings.get("federation.local_epochs", LOCAL_EPOCHS))   # or 10 rounds × 2 passes
    teacher = Teacher(config.model, silos["uk"].catalog, WORK / "dp-ablation-cache")
    if pca:     # the text adapter starts as the catalog texts' top principal directions (public data)
        directions = torch.linalg.svd(teacher.tower.text, full_matrices=False).Vh[:config.model.dim]
        with torch.no_grad():
            teacher.tower.text_adapter.copy_(directions * (teacher.tower.text_adapter.norm() / directions.norm()))
    plans = {}
    for region, silo in silos.items():
        users = [u for u in silo.users if can_train(u)]
        q, steps = round_shape(len(users), config.train.batch_size, passes)
        sigma = 0.0 if noise_off else noise_for_budget(EPSILON, DELTA, q, steps * rounds)
        plans[region] = (users, DPPlan(len(users), q, steps, sigma, 1.0))
    started, base_lr = time.perf_counter(), config.train.lr
    tower = teacher.adapter_state()
    averages: dict[float, dict] = {}
    for server_round in range(rounds):
        if decay:
            config.train.lr = base_lr * 0.5 * (1 + math.cos(math.pi * (server_round + 0.5) / rounds))
        updates = []
        for region, (users, plan) in plans.items():
            teacher.load_adapter_state(tower)
            train_private(RetrievalObjective(teacher.tower), users, config.train, plan, f"{region} round {server_round + 1}")
            updates.append((1 if uniform else len(users), teacher.adapter_state()))
        total = sum(n for n, _ in updates)
        tower = {k: sum(n / total * state[k] for n, state in updates) for k in tower}
        averages = {b: {k: b * averages[b][k] + (1 - b) * v for k, v in tower.items()} if averages else dict(tower)
                    for b in EMA_DECAYS}
    seconds = time.perf_counter() - started

    def test(state: dict) -> dict:
        teacher.load_adapter_state(state)
        return {r: m["ndcg@10"] for r, m in evaluate_ranker(TeacherRanker(teacher), silos).items()}

    return {"settings": settings, "rounds": rounds, "local_epochs": passes, "noise_off": noise_off, "decay": decay, "pca": pca, "uniform": uniform, "seconds": seconds,
            "sigma": {r: p.noise_multiplier for r, (_, p) in plans.items()},
            "test_ndcg@10": test(tower), "ema_test_ndcg@10": {str(b): test(s) for b, s in averages.items()}}


def main(name: str, settings: str = "{}", *flags: str) -> None:
    torch.manual_seed(0)
    path = RESULTS / "dp_ablation.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs.append({"name": name, **run(json.loads(settings), "--noise-off" in flags, "--decay" in flags,
                                      "--pca" in flags, "--uniform" in flags)})
    save("dp_ablation", {"epsilon": EPSILON, "delta": DELTA,
                         "runs": runs})


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
