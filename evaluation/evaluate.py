"""`fedrec evaluate`: every model ranks the full catalog for every evaluation user."""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from fedrec.config import ModelConfig
from fedrec.data.silo import Silo
from fedrec.evaluation.metrics import METRICS, rank_metrics
from fedrec.evaluation.rankers import (EASE, CoOccurrence, EvalCase, ItemKNN, Popularity, Ranker, TeacherRanker,
                                       ZeroShot)
from fedrec.model.teacher import Teacher, pick_device

Report = dict[str, dict[str, dict[str, float]]]   # model → region|"overall" → metric → value

log = logging.getLogger(__name__)


def eval_cases(silo: Silo, split: str) -> list[EvalCase]:
    return [EvalCase(*user.eval_case(split)) for user in silo.eval_users(split)]


def evaluate_ranker(ranker: Ranker, silos: dict[str, Silo], split: str = "test", chunk: int = 512,
                    targets: np.ndarray | None = None, desc: str | None = None) -> dict[str, dict[str, float]]:
    """Per-region means and the user-weighted overall mean of every metric. `targets` (a boolean
    mask over items) keeps only those target items, and only the users left with one: a slice.
    `desc` shows a progress bar per region (ranking the full catalog takes minutes on big data)."""
    per_region, pooled = {}, {m: [] for m in METRICS}
    for region, silo in silos.items():
        cases = eval_cases(silo, split)
        if targets is not None:
            cases = [EvalCase(c.history, c.ages, c.query, c.targets[targets[c.targets]])
                     for c in cases if targets[c.targets].any()]
        values = {m: [] for m in METRICS}
        for start in tqdm(range(0, len(cases), chunk), desc=f"{desc} {region}", unit="batch", leave=False,
                          disable=desc is None):
            part = cases[start:start + chunk]
            result = rank_metrics(ranker.score(region, part), [c.targets for c in part],
                                  [c.history for c in part])
            for m in METRICS:
                values[m].append(result[m])
        per_region[region] = summarise(values)
        for m in METRICS:
            pooled[m].extend(values[m])
    per_region["overall"] = summarise(pooled)
    return per_region


def cold_items(silos: dict[str, Silo], max_buyers: int = 2) -> np.ndarray:
    """Items with at most `max_buyers` buyers in the training baskets of every region."""
    n_items = len(next(iter(silos.values())).catalog)
    buyers = np.zeros(n_items, dtype=np.int64)
    for silo in silos.values():
        for user in silo.users:
            if user.train_baskets:
                buyers[np.unique(np.concatenate(user.train_baskets))] += 1
    return buyers <= max_buyers


def summarise(values: dict[str, list[np.ndarray]]) -> dict[str, float]:
    arrays = {m: np.concatenate(v) if v else np.zeros(0) for m, v in values.items()}
    users = len(arrays[METRICS[0]])
    return {"users": users, **{m: float(a.mean()) if users else float("nan") for m, a in arrays.items()}}


def evaluate(rankers: dict[str, Ranker], silos: dict[str, Silo], split: str = "test") -> Report:
    return {name: evaluate_ranker(ranker, silos, split, desc=f"{name} on {split}")
            for name, ranker in rankers.items()}


def format_report(report: Report, metrics: tuple[str, ...] = ("ndcg@10", "recall@10", "ndcg@20",
                                                               "recall@20", "mrr")) -> str:
    """A plain-text table, one row per model and region."""
    header = f"{'model':<28}{'region':<9}{'users':>7}" + "".join(f"{m:>11}" for m in metrics)
    lines = [header, "-" * len(header)]
    for model, regions in report.items():
        for region, row in regions.items():
            lines.append(f"{model:<28}{region:<9}{row['users']:>7}"
                         + "".join(f"{row[m]:>11.4f}" for m in metrics))
    return "\n".join(lines)


def build_rankers(silos: dict[str, Silo], checkpoints: list, peers: bool = True, zero_shot: bool = True,
                  encoder: str | None = None, batch_size: int = 1024) -> dict[str, Ranker]:
    """The standard line-up: the non-private peers (EASE's λ chosen on validation), the zero-shot
    encoder, then each teacher checkpoint given."""
    catalog = next(iter(silos.values())).catalog
    rankers: dict[str, Ranker] = {}
    if peers:
        log.info("peers: popularity, co-occurrence, ItemKNN, EASE (λ on validation)")
        rankers["popularity (global)"] = Popularity(silos)
        rankers["popularity (region)"] = Popularity(silos, per_region=True)
        rankers["co-occurrence"] = CoOccurrence(silos)
        rankers["ItemKNN"] = ItemKNN(silos)
        ease = EASE.tuned(silos, lambda r: evaluate_ranker(r, silos, "val", desc=f"EASE λ={r.l2:g} on val")
                          ["overall"]["ndcg@10"])
        rankers[f"EASE (λ={ease.l2:g})"] = ease
    encoding = f"encoding the catalog's {len(catalog):,} item texts with the frozen encoder"
    teachers = []
    for path in checkpoints:
        log.info(f"loading {path}: {encoding}")
        teachers.append(Teacher.load(path, catalog, encoder).to(pick_device()))
    if zero_shot:
        log.info("zero-shot encoder: item text vectors" + ("" if teachers else f"; {encoding}"))
        text = teachers[0].tower.text if teachers else Teacher(ModelConfig(encoder=encoder or ""), catalog).tower.text
        rankers["zero-shot encoder"] = ZeroShot(text.cpu().numpy())
    for path, teacher in zip(checkpoints, teachers):
        rankers[str(path)] = TeacherRanker(teacher, batch_size)
    return rankers
