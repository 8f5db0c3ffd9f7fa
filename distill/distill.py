"""`fedrec distill`: teach a small student to stand in for the teacher's large frozen encoder.

After export, text still has to be encoded: search queries, and items added to the catalog later.
The student learns that from public inputs only (catalog item texts and title fragments as
queries), against two targets: the teacher encoder's embedding of each text (cosine) and the
teacher's search ranking of the catalog for it (listwise KL over the teacher's top items and
random ones). The teacher is already trained (with DP in the regions), so the student is
post-processing of it and costs no additional ε; its metadata names the teacher and carries the
teacher's privacy claims so `fedrec audit` can follow the chain.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.model.student import Student, StudentConfig
from fedrec.distill.vocab import prune_vocabulary
from fedrec.evaluation.search import title_fragment
from fedrec.model.teacher import TEACHER_FILE, Teacher
from fedrec.privacy.claims import claims_to_json, parse_claims
from fedrec.training.early_stopping import EarlyStopping

log = logging.getLogger(__name__)

PUBLIC_INPUTS = "public only: catalog item texts and title fragments as search queries"


def public_texts(catalog: Catalog, queries_per_item: int, rng: np.random.Generator) -> list[str]:
    """Every item's text, and `queries_per_item` fragments of each title (what shoppers type)."""
    fragments = [title_fragment(t, rng) for t in catalog.titles if t.split() for _ in range(queries_per_item)]
    return catalog.texts() + fragments


def search_scores(teacher: Teacher, embeddings: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The teacher's search scores of `items` (rows of its item matrix) for text embeddings."""
    return teacher.search_rows(embeddings) @ items.T


@dataclass
class DistillResult:
    best_epoch: int
    validation: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def agreement(student: Student, teacher: Teacher, texts: list[str], targets: torch.Tensor,
              items: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean cosine to the teacher encoder's embeddings and top-k overlap of the search results."""
    embedded = student.encode_queries(texts)
    top_teacher = search_scores(teacher, targets, items).topk(k).indices
    top_student = search_scores(teacher, embedded, items).topk(k).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_teacher, top_student)])
    return {"cosine": float((embedded * targets).sum(-1).mean()), f"search_top{k}_overlap": float(overlap)}


def distill(teacher: Teacher, teacher_checkpoint: str | Path, config: FedrecConfig,
            out_dir: str | Path) -> tuple[Student, DistillResult]:
    cfg, model_cfg, catalog = config.distill, teacher.config, teacher.catalog
    teacher_meta = json.loads((Path(teacher_checkpoint) / TEACHER_FILE).read_text())
    claims = parse_claims(teacher_meta.get("privacy", {}), f"{teacher_checkpoint}'s privacy claims")  # before any work
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    texts = public_texts(catalog, cfg.queries_per_item, rng)
    order = rng.permutation(len(texts))
    held_out = max(200, len(texts) // 20)
    val_texts, train_texts = [texts[i] for i in order[:held_out]], [texts[i] for i in order[held_out:]]

    encoder = teacher.encoder
    tokenizer_json, kept = prune_vocabulary(encoder.tokenizer.backend_tokenizer.to_str(), texts, cfg.vocab_reserve,
                                            max(model_cfg.max_item_tokens, model_cfg.max_query_tokens))
    student = Student(StudentConfig.derive(cfg, model_cfg, len(kept), encoder.dim), tokenizer_json)
    embeddings = encoder.encoder.get_input_embeddings().weight.detach().cpu().numpy()
    positions = encoder.encoder.embeddings.position_embeddings.weight.detach().cpu().numpy()
    student.init_from_teacher(embeddings, positions, kept)
    student.to(teacher.device)
    log.info(f"student: {student.parameter_count():,} parameters in place of the encoder's "
             f"{teacher.parameter_counts()['encoder']:,}; vocabulary {len(kept):,} of {embeddings.shape[0]:,} tokens")

    log.info(f"teacher targets for {len(texts):,} public texts")
    targets = encoder.encode_queries(train_texts)
    val_targets = encoder.encode_queries(val_texts)
    items = teacher.item_matrix()
    with torch.no_grad():
        teacher_top = torch.cat([search_scores(teacher, targets[i:i + 1024], items).topk(cfg.hard_candidates).indices
                                 for i in range(0, len(targets), 1024)]).cpu().numpy()
    teacher.tower.requires_grad_(False)

    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(train_texts) // cfg.batch_size)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    result, stopper = DistillResult(0, {}), EarlyStopping(cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        student.train()
        order = rng.permutation(len(train_texts))
        losses = []
        for start in tqdm(range(0, len(order), cfg.batch_size), desc=f"distill epoch {epoch}/{cfg.epochs}", leave=False):
            batch = order[start:start + cfg.batch_size]
            random = rng.choice(len(catalog), size=min(cfg.candidates, len(catalog)), replace=False)
            candidates = torch.as_tensor(np.unique(np.concatenate([teacher_top[batch].ravel(), random])),
                                         device=student.device)
            out = student(**student.tokenize([train_texts[i] for i in batch], model_cfg.max_query_tokens))
            target = targets[torch.as_tensor(batch, device=targets.device)]
            listwise = F.kl_div(F.log_softmax(search_scores(teacher, out, items[candidates]), -1),
                                F.log_softmax(search_scores(teacher, target, items[candidates]), -1),
                                log_target=True, reduction="batchmean")
            loss = (1 - (out * target).sum(-1)).mean() + cfg.kl_weight * listwise
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        validation = agreement(student, teacher, val_texts, val_targets, items)
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses)), **validation})
        log.info(f"epoch {epoch}: loss {np.mean(losses):.4f}, cosine {validation['cosine']:.4f}, "
                 f"search top-10 overlap {validation['search_top10_overlap']:.3f}")
        snapshot = lambda: {k: v.detach().clone() for k, v in student.state_dict().items()}  # noqa: E731
        if stopper.update(epoch, validation["search_top10_overlap"] + 1e-3 * validation["cosine"], snapshot):
            result.best_epoch, result.validation = epoch, validation
        elif stopper.should_stop:
            log.info(f"early stop: no search overlap gain for {cfg.patience} epochs")
            break
    teacher.tower.requires_grad_(True)
    student.load_state_dict(stopper.best_state)
    result.seconds = time.perf_counter() - started
    student.save(out_dir, {
        "teacher": str(Path(teacher_checkpoint).resolve()),
        "teacher_encoder_parameters": teacher.parameter_counts()["encoder"],
        "privacy": claims_to_json(claims),
        "distillation_inputs": PUBLIC_INPUTS,
        "additional_epsilon": 0.0,
        "config": {k: v for k, v in config.to_flat().items() if k.startswith("distill.")},
        "best_epoch": result.best_epoch, "validation": result.validation, "history": result.history,
        "seconds": result.seconds,
    })
    return student, result
