"""Does training on a search log beat the zero-shot encoder on held-out queries?

Online Retail has no search log, so one is made from its real purchases, and is only as good as
that: every customer is put in the train or the held-out group (80/20, seeded); for up to
QUERIES_PER_USER of the distinct items they bought (drawn at random), the query is a title fragment
of that item (1 to 3 consecutive words of its catalog title, lower-cased: `title_fragment`) and the
item is its one relevant result (relevance 1 = purchased; the same fragment for two of a customer's
items makes one query with both). The train group's log goes through `fedrec data prepare --queries`
(one file per region, user_id given, so the unit of privacy is the customer in their region); the
held-out group's queries are judged by what that customer bought, over the full catalog, with the
existing metrics (`evaluation.metrics.rank_metrics`, binary gains).

What a model can learn here beyond text: which of the many items a fragment matches people buy.

    python bench/search_training.py [--epochs N] [--dp]   → results/search_training.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import ONLINE_RETAIL, REPO, RESULTS, WORK, save, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.prepare import prepare
from fedrec.data.silo import Silo, UserRecord, load_dataset
from fedrec.evaluation.metrics import rank_metrics
from fedrec.evaluation.search import title_fragment
from fedrec.model.teacher import Teacher
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.dp_sgd import train_private
from fedrec.privacy.spend import RegionPrivacy
from fedrec.tools.demo import DEMO_SETTINGS
from fedrec.training.objective import QueryVectors, RetrievalObjective, can_train, query_vectors
from fedrec.training.trainer import fit

QUERIES_PER_USER = 4
HELD_OUT_SHARE = 0.2
SHOWN = ("ndcg@10", "recall@10", "mrr")


def made_up_log(silos: dict[str, Silo], seed: int = 0) -> pd.DataFrame:
    """One row per (customer, query, purchased item): region, user_id, query, item_id, held_out."""
    rng = np.random.default_rng(seed)
    rows = []
    for region, silo in silos.items():
        for user in silo.users:
            held_out = bool(rng.random() < HELD_OUT_SHARE)
            bought = np.unique(np.concatenate(user.baskets))
            for item in rng.choice(bought, min(QUERIES_PER_USER, len(bought)), replace=False):
                title = silo.catalog.titles[item]
                if title.split():
                    rows.append((region, user.user_id, title_fragment(title, rng), silo.catalog.item_ids[item], held_out))
    return pd.DataFrame(rows, columns=["region", "user_id", "query", "item_id", "held_out"])


def held_out_cases(log: pd.DataFrame, index: dict[str, int]) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """The held-out customers' queries, each judged by the items that customer bought for it, and
    each query's region."""
    queries, targets, regions = [], [], []
    for (region, _, query), items in log[log["held_out"]].groupby(["region", "user_id", "query"], sort=True)["item_id"]:
        queries.append(query)
        targets.append(np.array([index[i] for i in items]))
        regions.append(region)
    return queries, targets, np.array(regions)


def search_metrics(scores: torch.Tensor, targets: list[np.ndarray]) -> dict[str, float]:
    values = rank_metrics(scores.cpu().numpy(), targets, [np.zeros(0, dtype=np.int64)] * len(targets))
    return {"queries": len(targets), **{m: float(values[m].mean()) for m in SHOWN}}


def evaluate(teacher: Teacher, embeddings: torch.Tensor, targets: list[np.ndarray]) -> dict[str, float]:
    """What `fedrec search` serves (`Teacher.encode_queries`, here from the queries' encoder
    embeddings, computed once): the query rows against the item matrix, full catalog."""
    with torch.no_grad():
        return search_metrics(teacher.search_rows(embeddings) @ teacher.item_matrix().T, targets)


def search_only(silos: dict[str, Silo]) -> dict[str, Silo]:
    """The train group's searches alone, as a region with only a search log would have."""
    return {r: Silo(r, s.catalog, [UserRecord(u.user_id, [], [], 0, u.searches) for u in s.users if u.searches])
            for r, s in silos.items()}


def train_dp(teacher: Teacher, users: list[UserRecord], config: FedrecConfig, region: str,
             queries: QueryVectors, records: Path) -> dict:
    """`fedrec train --dp` on one region's searchers, at the demo's settings (ε = 8 over
    federation.rounds rounds of federation.local_epochs), spending from a real ledger in `records`
    (kept: `fedrec audit RECORDS` reproduces the ε reported). The benchmark starts each run on
    fresh records: its users are public data, and a second run would find the budget spent."""
    if records.exists():
        shutil.rmtree(records)
    budget = RegionBudget(epsilon=8.0, delta=1e-5)
    objective = RetrievalObjective(teacher.tower)
    fed = config.federation
    privacy = RegionPrivacy(region, budget, records)
    for server_round in range(1, fed.rounds + 1):
        decision = privacy.plan_round(len(users), config.train.batch_size, fed.local_epochs, fed.rounds,
                                      "search-training")
        if not decision.allowed:
            raise RuntimeError(decision.reason)
        train_private(objective, users, config.train, decision.plan, f"dp round {server_round}", queries=queries)
        entry = privacy.record(decision, server_round)
        print(f"dp round {server_round}: ε {entry.epsilon:.3f}", flush=True)
    return {"region": region, "users": len(users), "epsilon": entry.epsilon, "delta": budget.delta,
            "noise_multiplier": entry.noise_multiplier, "rounds": fed.rounds, "local_epochs": fed.local_epochs,
            "audit": f"fedrec audit {records.relative_to(REPO)}"}


def main(epochs: int, dp: bool, dp_only: bool = False) -> None:
    work = WORK / "search-training"
    if not (work / "purchases" / "summary.json").is_file():     # prepared here: today's catalog rule
        prepare(ONLINE_RETAIL, work / "purchases")
    silos = load_dataset(work / "purchases")
    catalog = next(iter(silos.values())).catalog
    log = made_up_log(silos)
    files = {}
    for region, rows in log[~log["held_out"]].groupby("region"):
        files[region] = work / f"{region}-queries.csv"
        rows[["query", "item_id", "user_id"]].to_csv(files[region], index=False)
    prepared = prepare(ONLINE_RETAIL, work / "silos", queries=files) if not (work / "silos" / "summary.json").is_file() \
        else None
    trained_on = load_dataset(work / "silos")
    held_out_users = set(log.loc[log["held_out"], "user_id"])
    train_silos = {r: Silo(r, s.catalog, [u for u in s.users if u.user_id not in held_out_users])
                   for r, s in trained_on.items()}
    queries, targets, regions = held_out_cases(log, catalog.index)
    print(f"{len(log):,} made-up query rows; held out: {len(queries):,} queries of {len(held_out_users):,} customers",
          flush=True)

    config = FedrecConfig.from_flat({"train.epochs": epochs, **DEMO_SETTINGS})
    results: dict[str, dict] = {}
    torch.manual_seed(0)
    teacher = Teacher(config.model, catalog, work / "cache")
    untrained = teacher.adapter_state()
    embeddings = teacher.encoder.encode_queries(queries)
    zero_shot = teacher.text_vectors(embeddings) @ teacher.tower.text.T
    results["zero-shot encoder (cosine, no tower)"] = search_metrics(zero_shot, targets)
    results["untrained tower (search_rows)"] = evaluate(teacher, embeddings, targets)
    print(results, flush=True)

    began = time.perf_counter()
    encoded = query_vectors(teacher, [u for silo in train_silos.values() for u in silo.users])
    timings = {"encoding the train queries": time.perf_counter() - began}
    print(f"{len(encoded):,} distinct train queries encoded in {timings['encoding the train queries']:.0f}s", flush=True)
    report = {
        "log": {"made_from": str(ONLINE_RETAIL), "queries_per_user": QUERIES_PER_USER,
                "held_out_share": HELD_OUT_SHARE, "rows": len(log), "held_out_queries": len(queries),
                "held_out_customers": len(held_out_users), "distinct_train_queries": len(encoded),
                "prepare_summary": prepared.summary["queries"] if prepared else "reused"},
        "settings": {"train.epochs": epochs, **DEMO_SETTINGS, "encoder": "all-MiniLM-L6-v2 (bundled)"},
        "results": results, "dp": None, "train_seconds": timings,
        "host": "2 CPU cores shared with other engineers' jobs",
    }
    if dp_only:                 # the DP run again, beside the central results already saved
        saved = json.loads((RESULTS / "search_training.json").read_text())
        kept = {name: row for name, row in saved["results"].items() if not name.startswith("uk alone under DP")}
        report = {**saved, "results": {**kept, **results}, "train_seconds": {**saved["train_seconds"], **timings}}
        results, timings = report["results"], report["train_seconds"]

    def central(name: str, train: dict[str, Silo]) -> None:
        teacher.load_adapter_state(untrained)
        torch.manual_seed(0)
        began = time.perf_counter()
        fit(teacher, train, config, queries=encoded)
        timings[name] = time.perf_counter() - began
        results[name] = evaluate(teacher, embeddings, targets)
        print(name, results[name], flush=True)
        save("search_training", report)       # after every model: a slow later one loses nothing

    if not dp_only:
        central("trained on the search log alone", search_only(train_silos))
    if dp or dp_only:
        teacher.load_adapter_state(untrained)
        users = [u for u in search_only(train_silos)["uk"].users if can_train(u)]
        began = time.perf_counter()
        report["dp"] = train_dp(teacher, users, config, "uk", encoded, work / "dp-records")
        timings["dp"] = time.perf_counter() - began
        uk = np.flatnonzero(regions == "uk")
        uk_targets = [targets[i] for i in uk]
        name = f"uk alone under DP (ε={report['dp']['epsilon']:.2f}), search log alone, on uk's held-out queries"
        results[name] = evaluate(teacher, embeddings[uk], uk_targets)
        results["zero-shot encoder on uk's held-out queries"] = search_metrics(zero_shot[uk], uk_targets)
        print(name, results[name], flush=True)
        save("search_training", report)
    if not dp_only:
        central("trained on baskets + search log (multi-task)", train_silos)
    for name, row in results.items():
        print(f"{name:<58}" + "".join(f"{m} {row[m]:.4f}  " for m in SHOWN))


if __name__ == "__main__":
    show_progress()
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--dp-only", action="store_true", help="only the DP run, into the results already saved")
    args = parser.parse_args()
    main(args.epochs, args.dp, args.dp_only)
