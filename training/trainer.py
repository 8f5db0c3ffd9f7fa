"""Non-private training: central (all regions pooled, the upper bound) or one region alone.

`train_epochs` is also what a region runs for a non-private federated round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
import transformers

from fedrec.atomic import write_json
from fedrec.config import FedrecConfig, TrainConfig
from fedrec.data.silo import Silo, UserRecord
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.model.teacher import Teacher
from fedrec.training.early_stopping import EarlyStopping
from fedrec.errors import FedrecError
from fedrec.training.objective import (QueryVectors, RetrievalObjective, batch_inputs, can_train, make_example,
                                       prediction_points, query_vectors)

log = logging.getLogger(__name__)


def make_optimizer(objective: RetrievalObjective, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(objective.tower.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_epochs(objective: RetrievalObjective, optimizer: torch.optim.Optimizer,
                 users: list[UserRecord], cfg: TrainConfig, epochs: float,
                 rng: np.random.Generator, desc: str = "train",
                 regulariser: Callable[[], torch.Tensor] | None = None,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                 queries: QueryVectors | None = None) -> list[float]:
    """Shuffled passes over every prediction point (basket or search) of every user (a fractional
    last pass covers that share of them); returns each pass's mean loss.

    `regulariser` adds a data-independent term to every step's loss (FedProx's proximal term);
    `queries` holds the text vectors of the users' searches (`query_vectors`)."""
    users = [u for u in users if can_train(u)]
    points = [(u, p) for u, user in enumerate(users) for p in prediction_points(user)]
    history_items = objective.tower.config.history_items
    device = objective.tower.text.device
    losses = []
    objective.train()
    passes = math.ceil(epochs)
    for epoch in range(passes):
        order = rng.permutation(len(points))
        order = order[: max(1, round(min(1.0, epochs - epoch) * len(order)))]
        total, count = 0.0, 0
        label = f"{desc} epoch {epoch + 1}/{passes}" if passes > 1 else desc
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=label, leave=False, unit="batch")
        for start in bar:
            examples = [make_example(users[points[i][0]], points[i][1], rng, queries) for i in order[start:start + cfg.batch_size]]
            loss = objective(**batch_inputs(examples, history_items, cfg.max_targets, rng, device)).mean()
            optimizer.zero_grad(set_to_none=True)
            (loss + regulariser() if regulariser else loss).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total, count = total + loss.item() * len(examples), count + len(examples)
            bar.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / max(count, 1))
    return losses


@dataclass
class FitResult:
    best_epoch: int
    best_val_ndcg: float
    history: list[dict] = field(default_factory=list)


def fit(teacher: Teacher, silos: dict[str, Silo], config: FedrecConfig, out_dir: str | Path | None = None,
        queries: QueryVectors | None = None) -> FitResult:
    """Train on the pooled users of `silos` (their baskets and searches), early-stopping on
    validation NDCG@10. Without validation users (none has three baskets: e.g. a region with only
    a search log) every epoch runs and the last is kept.

    The best tower is kept in `teacher` and, with `out_dir`, saved there with the history.
    `queries`: the searches' text vectors if already encoded (`query_vectors`), else encoded here.
    """
    cfg = config.train
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    users = [u for silo in silos.values() for u in silo.users if can_train(u)]
    if not users:
        raise FedrecError(f"no user in {', '.join(sorted(silos))} has anything to train on",
                          hint="A user needs two baskets, a basket of two items, or a search with a relevant item.")
    queries = query_vectors(teacher, users) if queries is None else queries
    objective = RetrievalObjective(teacher.tower)
    optimizer = make_optimizer(objective, cfg)
    steps = cfg.epochs * math.ceil(sum(len(prediction_points(u)) for u in users) / cfg.batch_size)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, math.ceil(0.05 * steps), steps)
    validate = any(u.has_split("val") for silo in silos.values() for u in silo.users)
    searches = sum(len(u.searches) for u in users)
    log.info(f"training on {len(users):,} users ({searches:,} searches): up to {cfg.epochs} epoch(s) of "
             f"{steps // cfg.epochs:,} steps, " + ("each followed by validation" if validate else "no validation "
                                                "users (none has 3 baskets): every epoch runs, the last is kept"))
    result, stopper = FitResult(0, float("nan")), EarlyStopping(cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        (loss,) = train_epochs(objective, optimizer, users, cfg, 1, rng, f"epoch {epoch}/{cfg.epochs}",
                               schedule=schedule, queries=queries)
        seconds = time.perf_counter() - started
        result.history.append({"epoch": epoch, "loss": loss, "epoch_seconds": seconds})
        if not validate:
            log.info(f"epoch {epoch}: loss {loss:.4f} ({seconds:.0f}s)")
            result.best_epoch = epoch
            continue
        val = evaluate_ranker(TeacherRanker(teacher, cfg.eval_batch_size), silos, "val",
                              desc=f"epoch {epoch}/{cfg.epochs} validation")
        ndcg = val["overall"]["ndcg@10"]
        result.history[-1]["val"] = val
        log.info(f"epoch {epoch}: loss {loss:.4f}, val NDCG@10 {ndcg:.4f} ({seconds:.0f}s)")
        if stopper.update(epoch, ndcg, teacher.adapter_state):
            result.best_epoch, result.best_val_ndcg = epoch, ndcg
            if out_dir:
                teacher.save(out_dir, {"trained_on": sorted(silos), "epoch": epoch, "val_ndcg@10": ndcg})
        elif stopper.should_stop:
            log.info(f"early stop: no validation gain for {cfg.patience} epoch(s)")
            break
    if validate:
        teacher.load_adapter_state(stopper.best_state)
    elif out_dir:
        teacher.save(out_dir, {"trained_on": sorted(silos), "epoch": result.best_epoch, "val_ndcg@10": None})
    if out_dir:
        write_json(Path(out_dir) / "history.json", {"config": config.to_flat(), **vars(result)})
    return result
