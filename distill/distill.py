"""`fedrec distill`: teach a small student to reproduce the teacher's embeddings and rankings.

Inputs are public only: catalog item texts, synthetic user contexts made of random catalog item
sequences, and title fragments as search queries. The teacher is already trained (with DP in the
regions), so the student is post-processing of it and costs no additional ε; its metadata names
the teacher and the teacher's ledger heads so `fedrec audit` can follow the chain.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.distill.student import Student, StudentConfig
from fedrec.distill.vocab import prune_vocabulary
from fedrec.model.teacher import TEACHER_FILE, Teacher
from fedrec.text import context_text
from fedrec.training.early_stopping import EarlyStopping

PUBLIC_INPUTS = "public only: catalog item texts, synthetic contexts of catalog items, title fragments as queries"


def synthetic_contexts(catalog: Catalog, count: int, max_items: int, rng: np.random.Generator,
                       neighbours: np.ndarray | None = None) -> list[str]:
    """User-like contexts from public data: 1..max_items catalog items, sometimes a query.

    With `neighbours` (each item's nearest catalog items under the teacher), half the contexts
    are coherent, a seed item and its neighbours, as real shoppers' histories tend to be; the
    rest are random items. Both are functions of the catalog and the teacher only.
    """
    out = []
    for _ in range(count):
        size = int(rng.integers(1, max_items + 1))
        if neighbours is not None and rng.random() < 0.5:
            seed = int(rng.integers(len(catalog)))
            items = [seed, *rng.choice(neighbours[seed], size=min(size - 1, neighbours.shape[1]), replace=False)]
        else:
            items = rng.choice(len(catalog), size=size, replace=False)
        query = title_fragment(catalog.titles[int(rng.integers(len(catalog)))], rng) if rng.random() < 0.2 else ""
        out.append(context_text([catalog.titles[i] for i in items], query, max_items))
    return out


def nearest_items(embeddings: torch.Tensor, queries: torch.Tensor, k: int, exclude_self: bool = False,
                  chunk: int = 1024) -> np.ndarray:
    """Indices of the k most similar catalog items for each query row, by chunked dot product."""
    out = []
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ embeddings.T
        if exclude_self:
            scores[torch.arange(len(scores)), torch.arange(start, start + len(scores))] = -torch.inf
        out.append(scores.topk(k).indices.cpu().numpy())
    return np.concatenate(out)


def title_fragment(title: str, rng: np.random.Generator) -> str:
    words = title.lower().split()
    length = int(rng.integers(1, min(3, len(words)) + 1))
    start = int(rng.integers(0, len(words) - length + 1))
    return " ".join(words[start:start + length])


def query_texts(catalog: Catalog, per_item: int, rng: np.random.Generator) -> list[str]:
    return [context_text([], title_fragment(title, rng)) for title in catalog.titles for _ in range(per_item)]


def batch_candidates(hard: np.ndarray, n_items: int, n_random: int, rng: np.random.Generator) -> np.ndarray:
    """The batch's teacher top items (where the ranking is decided) plus random catalog items."""
    random = rng.choice(n_items, size=min(n_random, n_items), replace=False)
    return np.unique(np.concatenate([hard.ravel(), random]))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05):
    """Linear warm-up over the first 5 % of steps, then cosine decay to zero."""
    warmup_steps = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class DistillResult:
    best_epoch: int
    validation: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def agreement(student: Student, teacher_contexts: torch.Tensor, teacher_items: torch.Tensor,
              contexts: list[str], catalog: Catalog, k: int = 10) -> dict[str, float]:
    """Mean cosine to the teacher's embeddings and top-k overlap of the retrieved items."""
    student_items = student.encode_items(catalog)
    student_contexts = student.encode_contexts(contexts)
    top_teacher = (teacher_contexts @ teacher_items.T).topk(k).indices
    top_student = (student_contexts @ student_items.T).topk(k).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_teacher, top_student)])
    return {"context_cosine": float((student_contexts * teacher_contexts).sum(-1).mean()),
            "item_cosine": float((student_items * teacher_items).sum(-1).mean()),
            f"top{k}_overlap": float(overlap)}


def distill(teacher: Teacher, teacher_checkpoint: str | Path, catalog: Catalog, config: FedrecConfig,
            out_dir: str | Path, log: Callable[[str], None] = print) -> tuple[Student, DistillResult]:
    cfg, model_cfg = config.distill, teacher.config
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = catalog.texts()
    log(f"teacher embeddings of {len(items):,} catalog items")
    target_items = teacher.encode_items(catalog)
    neighbours = nearest_items(target_items, target_items, min(cfg.neighbours, len(catalog) - 1), exclude_self=True)
    contexts = synthetic_contexts(catalog, cfg.contexts, model_cfg.context_items, rng, neighbours)
    contexts += query_texts(catalog, cfg.queries_per_item, rng)
    held_out = max(200, len(contexts) // 20)
    train_contexts, val_contexts = contexts[held_out:], contexts[:held_out]

    tokenizer_json, kept = prune_vocabulary(teacher.tokenizer.backend_tokenizer.to_str(), items + contexts,
                                            cfg.vocab_reserve, max(model_cfg.max_item_tokens, model_cfg.max_context_tokens))
    student = Student(StudentConfig.derive(cfg, model_cfg, len(kept), teacher.dim), tokenizer_json)
    embeddings = teacher.encoder.get_input_embeddings().weight.detach().cpu().numpy()
    positions = teacher.encoder.base_model.model.embeddings.position_embeddings.weight.detach().cpu().numpy()
    student.init_from_teacher(embeddings, positions, kept)
    student.to(teacher.device)
    log(f"student: {student.parameter_count():,} parameters (teacher {teacher.parameter_counts()['total']:,}), "
        f"vocabulary {len(kept):,} of {embeddings.shape[0]:,} tokens")

    log(f"teacher targets for {len(contexts):,} public contexts")
    target_contexts = teacher.encode(train_contexts, model_cfg.max_context_tokens)
    val_targets = teacher.encode(val_contexts, model_cfg.max_context_tokens)
    teacher_top = nearest_items(target_items, target_contexts, cfg.hard_candidates)

    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    schedule = warmup_cosine(optimizer, cfg.epochs * -(-len(train_contexts) // cfg.batch_size))
    result, stopper = DistillResult(0, {}), EarlyStopping(cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        student.train()
        order = rng.permutation(len(train_contexts))
        losses = []
        for start in tqdm(range(0, len(order), cfg.batch_size), desc=f"distill epoch {epoch}", leave=False):
            batch = order[start:start + cfg.batch_size]
            candidates = torch.as_tensor(batch_candidates(teacher_top[batch], len(catalog),
                                                          cfg.candidates, rng), device=student.device)
            ctx = student(**student.tokenize([train_contexts[i] for i in batch], model_cfg.max_context_tokens))
            cand = student(**student.tokenize([items[i] for i in candidates.tolist()], model_cfg.max_item_tokens))
            teacher_ctx, teacher_cand = target_contexts[torch.as_tensor(batch)], target_items[candidates]
            embed_loss = (1 - (ctx * teacher_ctx).sum(-1)).mean() + (1 - (cand * teacher_cand).sum(-1)).mean()
            tau = cfg.kl_temperature
            listwise = F.kl_div(F.log_softmax(ctx @ cand.T / tau, -1), F.log_softmax(teacher_ctx @ teacher_cand.T / tau, -1),
                                log_target=True, reduction="batchmean")
            loss = embed_loss + cfg.kl_weight * listwise
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        validation = agreement(student, val_targets, target_items, val_contexts, catalog)
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses)), **validation})
        log(f"epoch {epoch}: loss {np.mean(losses):.4f}, context cosine {validation['context_cosine']:.4f}, "
            f"top-10 overlap {validation['top10_overlap']:.3f}")
        snapshot = lambda: {k: v.detach().clone() for k, v in student.state_dict().items()}  # noqa: E731
        if stopper.update(epoch, validation["top10_overlap"] + 1e-3 * validation["context_cosine"], snapshot):
            result.best_epoch, result.validation = epoch, validation
        elif stopper.should_stop:
            log(f"early stop: no top-10 overlap gain for {cfg.patience} epochs")
            break
    student.load_state_dict(stopper.best_state)
    result.seconds = time.perf_counter() - started
    teacher_meta = json.loads((Path(teacher_checkpoint) / TEACHER_FILE).read_text())
    student.save(out_dir, {
        "teacher": str(Path(teacher_checkpoint).resolve()),
        "teacher_parameters": teacher.parameter_counts()["total"],
        "privacy": teacher_meta.get("privacy", {}),
        "distillation_inputs": PUBLIC_INPUTS,
        "additional_epsilon": 0.0,
        "config": {k: v for k, v in config.to_flat().items() if k.startswith("distill.")},
        "best_epoch": result.best_epoch, "validation": result.validation, "history": result.history,
        "seconds": result.seconds,
    })
    return student, result
