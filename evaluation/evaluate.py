"""`fedrec evaluate`: every model ranks the full catalog for every evaluation user."""

from __future__ import annotations

import numpy as np

from fedrec.data.silo import Silo
from fedrec.evaluation.metrics import METRICS, rank_metrics
from fedrec.evaluation.rankers import EvalCase, Ranker

Report = dict[str, dict[str, dict[str, float]]]   # model → region|"overall" → metric → value


def eval_cases(silo: Silo, split: str) -> list[EvalCase]:
    return [EvalCase(*user.eval_case(split)) for user in silo.eval_users(split)]


def evaluate_ranker(ranker: Ranker, silos: dict[str, Silo], split: str = "test",
                    chunk: int = 512) -> dict[str, dict[str, float]]:
    """Per-region means and the user-weighted overall mean of every metric."""
    per_region, pooled = {}, {m: [] for m in METRICS}
    for region, silo in silos.items():
        cases = eval_cases(silo, split)
        values = {m: [] for m in METRICS}
        for start in range(0, len(cases), chunk):
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


def summarise(values: dict[str, list[np.ndarray]]) -> dict[str, float]:
    arrays = {m: np.concatenate(v) if v else np.zeros(0) for m, v in values.items()}
    users = len(arrays[METRICS[0]])
    return {"users": users, **{m: float(a.mean()) if users else float("nan") for m, a in arrays.items()}}


def evaluate(rankers: dict[str, Ranker], silos: dict[str, Silo], split: str = "test") -> Report:
    return {name: evaluate_ranker(ranker, silos, split) for name, ranker in rankers.items()}


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


def build_rankers(silos: dict[str, Silo], checkpoints: list, baselines: bool = True,
                  zero_shot: bool = True, encoder: str | None = None,
                  batch_size: int = 128) -> dict[str, Ranker]:
    """The standard line-up: baselines, the zero-shot encoder, then each checkpoint given."""
    from fedrec.config import ModelConfig
    from fedrec.evaluation.rankers import CoOccurrence, EncoderRanker, Popularity
    from fedrec.model.teacher import Teacher, pick_device

    catalog = next(iter(silos.values())).catalog
    rankers: dict[str, Ranker] = {}
    if baselines:
        rankers["popularity (global)"] = Popularity(silos)
        rankers["popularity (region)"] = Popularity(silos, per_region=True)
        rankers["co-occurrence"] = CoOccurrence(silos)
    if zero_shot:
        teacher = Teacher(ModelConfig(encoder=encoder or "")).to(pick_device())
        rankers["zero-shot encoder"] = EncoderRanker(teacher, catalog, teacher.config.context_items, batch_size)
    for path in checkpoints:
        encoder = load_encoder(path).to(pick_device())
        rankers[str(path)] = EncoderRanker(encoder, catalog, encoder.config.context_items, batch_size)
    return rankers


def load_encoder(checkpoint):
    """A teacher or a student checkpoint, told apart by its metadata file."""
    from pathlib import Path

    from fedrec.distill.student import STUDENT_FILE, Student
    from fedrec.model.teacher import Teacher

    return Student.load(checkpoint) if (Path(checkpoint) / STUDENT_FILE).is_file() else Teacher.load(checkpoint)
