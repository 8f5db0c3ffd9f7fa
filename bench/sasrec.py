"""SASRec (Kang & McAuley 2018) on the next-basket split: the ID-only sequential reference.

A compact re-implementation (RecBole is not installed): causal self-attention over a user's item-id
sequence, learned positions plus a learned basket-age embedding, tied input/output item embeddings.
Like the other peers it is non-private: one model trained centrally on every region's training
baskets, and `evaluate_ranker` scores it on the same users, targets and exclusions as every other model.

The task is the NEXT BASKET, so training is next-basket prediction:
- items inside a basket have no order (the stored order is by stock code), so every epoch each
  training basket is shuffled afresh (the seed's RNG) before a user's baskets are flattened in time order;
- one sample per training basket whose next basket is also a training basket: the input is the newest
  max_len items up to the end of that basket, each tagged with its basket age (0 = that basket, capped),
  and the loss is taken at the last position only;
- its target is every item of the next basket: multi-target softmax cross-entropy over the full catalog
  (the mean negative log-probability of the next basket's items), with the items already in the user's
  sequence so far masked out of the softmax, as the evaluation excludes history items.
Users with a single training basket give no training sample; they are still evaluated.

    python bench/sasrec.py                 # seeds 0 1 2 → bench/results/sasrec.json
    python bench/sasrec.py --patience 10 --variant patience_10    # sensitivity, added to the same file

The first run of this script used the plain next-item protocol (stored within-basket order, every
position predicts the next item, 96% of targets inside the same basket); its numbers are kept in the
results file under "within_basket_next_item".
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")   # the machine is shared: one core for this benchmark

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save, show_progress, silos_dir  # noqa: E402

from fedrec.atomic import write_json  # noqa: E402
from fedrec.data.silo import Silo, load_dataset  # noqa: E402
from fedrec.evaluation.evaluate import evaluate_ranker  # noqa: E402
from fedrec.evaluation.rankers import EvalCase  # noqa: E402

log = logging.getLogger(__name__)

LABEL = "SASRec (ID-only, non-private reference)"
PROTOCOL = "next_basket"
SETTINGS = {"protocol": "next-basket prediction", "blocks": 2, "heads": 1, "hidden": 64, "dropout": 0.2,
            "max_len": 50, "max_age": 15, "lr": 1e-3, "adam_betas": (0.9, 0.98), "batch_size": 128,
            "max_epochs": 30, "patience": 3,
            "early_stopping": "validation ndcg@10 (overall), best epoch's weights restored for test",
            "within_basket_order": "shuffled afresh every epoch (numpy default_rng(seed)) before flattening",
            "training_samples": "one per training basket whose next basket is a training basket: the newest "
                                "max_len items up to the end of that basket (oldest → newest); loss only at "
                                "its last position",
            "embeddings": "item (tied with the output) + learned position (newest item = last) + learned "
                          "basket age (0 = the most recent basket at that point, capped at max_age)",
            "loss": "multi-target softmax cross-entropy over the whole catalog: mean negative "
                    "log-probability of the next basket's items (each sample weighted equally), items "
                    "already in the user's sequence so far masked out of the softmax",
            "eval_input": "the newest max_len history items, oldest → newest, stored within-basket order, "
                          "with their basket ages; user = last hidden state; history items excluded",
            "training_data": "pooled training baskets of every region (central, non-private)",
            "threads": 1}
METRICS = ("ndcg@10", "recall@10", "mrr")


class Block(nn.Module):
    """One SASRec block as in the authors' code: layer-normed queries attend causally over the
    sequence, then a position-wise feed-forward layer, both residual."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        query = self.attn_norm(x)
        x = query + self.attn(query, x, x, attn_mask=blocked, need_weights=False)[0]
        x = self.ffn_norm(x)
        return x + self.ffn(x)


class SASRec(nn.Module):
    """Token 0 pads (sequences are left-padded so the newest item is last); item i is token i + 1."""

    def __init__(self, n_items: int, hidden: int, blocks: int, heads: int, dropout: float, max_len: int,
                 max_age: int):
        super().__init__()
        self.heads, self.max_age = heads, max_age
        self.items = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.ages = nn.Embedding(max_age + 1, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        for embedding in (self.items, self.positions, self.ages):   # N(0, 1) × √hidden would swamp the logits
            nn.init.xavier_normal_(embedding.weight)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, tokens: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """batch × length tokens and basket ages → batch × length hidden states, each seeing only
        itself and earlier items."""
        length = tokens.shape[1]
        real = (tokens > 0).unsqueeze(-1)
        x = (self.items(tokens) * self.items.embedding_dim ** 0.5 + self.positions(torch.arange(length))
             + self.ages(ages.clamp(0, self.max_age)))
        x = self.dropout(x) * real
        # Block the future and the padding; every position may see itself, so no row is empty.
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool), 1) | (tokens == 0).unsqueeze(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool)
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        for block in self.blocks:
            x = block(x, blocked) * real
        return self.norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.items.weight[1:].T


class NextBasketSamples:
    """One sample per (user, training basket b) whose basket b + 1 is also a training basket.

    Fixed across epochs: `seen` (samples × items, the items of baskets 0..b, masked out of the
    softmax) and `target` (samples × items, the items of basket b + 1 not seen before). Rebuilt each
    epoch by `windows`: the input tokens and ages, after shuffling every basket's items."""

    def __init__(self, silos: dict[str, Silo], max_len: int):
        self.max_len = max_len
        self.users = [user.train_baskets for silo in silos.values() for user in silo.users
                      if user.n_train >= 2]
        self.single_basket_users = sum(user.n_train < 2 for silo in silos.values() for user in silo.users)
        n_items = len(next(iter(silos.values())).catalog)
        rows = sum(len(baskets) - 1 for baskets in self.users)
        seen = np.zeros((rows, n_items), dtype=bool)
        target = np.zeros((rows, n_items), dtype=bool)
        row = 0
        for baskets in self.users:
            so_far = np.zeros(n_items, dtype=bool)
            for b in range(len(baskets) - 1):
                so_far[baskets[b]] = True
                seen[row] = so_far
                target[row, baskets[b + 1]] = True
                row += 1
        target &= ~seen
        keep = target.any(1)              # a next basket of repeats only has nothing to predict
        self.keep = np.flatnonzero(keep)
        self.seen, self.target = torch.as_tensor(seen[keep]), torch.as_tensor(target[keep])
        self.dropped_no_new_item = int((~keep).sum())

    def __len__(self) -> int:
        return len(self.keep)

    def windows(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, ages), both samples × max_len, left-padded (token 0, age 0)."""
        tokens = np.zeros((sum(len(b) - 1 for b in self.users), self.max_len), dtype=np.int64)
        ages = np.zeros_like(tokens)
        row = 0
        for baskets in self.users:
            shuffled = [rng.permutation(basket) for basket in baskets[:-1]]
            sequence = np.concatenate(shuffled) + 1
            basket_of = np.repeat(np.arange(len(shuffled)), [len(b) for b in shuffled])
            ends = np.cumsum([len(b) for b in shuffled])
            for b, end in enumerate(ends):
                start = max(0, end - self.max_len)
                tokens[row, self.max_len - (end - start):] = sequence[start:end]
                ages[row, self.max_len - (end - start):] = b - basket_of[start:end]
                row += 1
        return torch.as_tensor(tokens[self.keep]), torch.as_tensor(ages[self.keep])


def next_basket_loss(logits: torch.Tensor, seen: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the mean negative log-probability of the target items, seen items masked."""
    log_p = torch.log_softmax(logits.masked_fill(seen, float("-inf")), dim=1)
    per_sample = torch.where(target, log_p, torch.zeros((), dtype=log_p.dtype)).sum(1) / target.sum(1)
    return -per_sample.mean()


class SASRecRanker:
    """`score` for `evaluate_ranker`: the user is the last hidden state after reading the history."""

    def __init__(self, model: SASRec, max_len: int, batch_size: int = 512):
        self.model, self.max_len, self.batch_size = model, max_len, batch_size

    def score(self, region: str, cases: list[EvalCase]) -> np.ndarray:
        tokens = np.zeros((len(cases), self.max_len), dtype=np.int64)
        ages = np.zeros_like(tokens)
        for row, case in enumerate(cases):
            items, item_ages = case.history[::-1][-self.max_len:], case.ages[::-1][-self.max_len:]
            if len(items):
                tokens[row, -len(items):] = items + 1
                ages[row, -len(items):] = item_ages
        self.model.eval()
        with torch.no_grad():
            out = [self.model.logits(self.model(torch.as_tensor(tokens[s:s + self.batch_size]),
                                                torch.as_tensor(ages[s:s + self.batch_size]))[:, -1])
                   for s in range(0, len(cases), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.items.num_embeddings - 1))


def train(silos: dict[str, Silo], seed: int, settings: dict) -> tuple[SASRecRanker, dict]:
    """Adam on the next-basket loss; stops once validation NDCG@10 has not improved for `patience` epochs."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_items = len(next(iter(silos.values())).catalog)
    model = SASRec(n_items, settings["hidden"], settings["blocks"], settings["heads"], settings["dropout"],
                   settings["max_len"], settings["max_age"])
    ranker = SASRecRanker(model, settings["max_len"])
    samples = NextBasketSamples(silos, settings["max_len"])
    optimiser = torch.optim.Adam(model.parameters(), lr=settings["lr"], betas=settings["adam_betas"])
    best_state, best_ndcg, best_epoch, history = None, -np.inf, 0, []
    for epoch in range(1, settings["max_epochs"] + 1):
        model.train()
        started, total = time.perf_counter(), 0.0
        tokens, ages = samples.windows(rng)
        for batch in torch.randperm(len(samples), generator=generator).split(settings["batch_size"]):
            states = model(tokens[batch], ages[batch])[:, -1]
            loss = next_basket_loss(model.logits(states), samples.seen[batch], samples.target[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        val_ndcg = evaluate_ranker(ranker, silos, "val")["overall"]["ndcg@10"]
        history.append({"epoch": epoch, "loss": total / len(samples), "val_ndcg@10": val_ndcg,
                        "train_s": train_s, "val_s": time.perf_counter() - started})
        log.info(f"seed {seed} epoch {epoch}: loss {total / len(samples):.4f}  val ndcg@10 {val_ndcg:.4f}  "
                 f"{train_s:.1f}s train")
        if val_ndcg > best_ndcg:
            best_state, best_ndcg, best_epoch = copy.deepcopy(model.state_dict()), val_ndcg, epoch
        elif epoch - best_epoch >= settings["patience"]:
            break
    model.load_state_dict(best_state)
    return ranker, {"samples": len(samples), "target_items": int(samples.target.sum()),
                    "users_trained": len(samples.users),
                    "users_single_training_basket": samples.single_basket_users,
                    "samples_dropped_no_new_item": samples.dropped_no_new_item,
                    "epochs_run": len(history), "best_epoch": best_epoch, "best_val_ndcg@10": best_ndcg,
                    "seconds_per_epoch": float(np.mean([h["train_s"] for h in history])),
                    "val_seconds_per_epoch": float(np.mean([h["val_s"] for h in history])), "epochs": history}


def spread(per_seed: list[dict]) -> dict:
    """region → metric → mean, min and max across seeds."""
    return {region: {m: {"mean": float(np.mean([r[region][m] for r in per_seed])),
                         "min": float(np.min([r[region][m] for r in per_seed])),
                         "max": float(np.max([r[region][m] for r in per_seed]))} for m in METRICS}
            | {"users": per_seed[0][region]["users"]}
            for region in per_seed[0]}


def earlier_protocol() -> dict | None:
    """The within-basket next-item run already in the results file (kept, not re-run)."""
    path = RESULTS / "sasrec.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if "within_basket_next_item" in old:
        return old["within_basket_next_item"]
    if old.get("settings", {}).get("protocol") == SETTINGS["protocol"]:
        return None
    return {"description": "the first run: plain SASRec next-item training on the flattened baskets in "
                           "their stored order (sorted by stock code), every position predicting the next "
                           "item; 96% of its targets were the next item inside the same basket, so it "
                           "learnt 'next stock code'. No basket-age embedding, no history masking in "
                           "training. Kept for the record, not re-run.",
            **{k: old[k] for k in ("finished", "machine", "settings", "seeds", "test", "runs",
                                   "total_seconds") if k in old}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=SETTINGS["max_epochs"])
    parser.add_argument("--max-len", type=int, default=SETTINGS["max_len"])
    parser.add_argument("--patience", type=int, default=SETTINGS["patience"])
    parser.add_argument("--variant", help="store this run under variants.VARIANT of the existing results "
                                          "file instead of as the main result (a sensitivity check)")
    parser.add_argument("--no-save", action="store_true", help="print only (for a quick check)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {**SETTINGS, "max_epochs": args.max_epochs, "max_len": args.max_len, "patience": args.patience}
    silos = load_dataset(silos_dir())
    earlier = earlier_protocol()
    started, runs = time.perf_counter(), {}
    for seed in args.seeds:
        ranker, training = train(silos, seed, settings)
        runs[seed] = {"training": training, "test": evaluate_ranker(ranker, silos, "test")}
        overall = runs[seed]["test"]["overall"]
        print(f"seed {seed} test: " + "  ".join(f"{m} {overall[m]:.4f}" for m in METRICS), flush=True)
    summary = spread([run["test"] for run in runs.values()])
    print(json.dumps({r: {m: round(v["mean"], 4) for m, v in row.items() if m != "users"}
                      for r, row in summary.items()}))
    if args.no_save:
        return
    if args.variant:
        path = RESULTS / "sasrec.json"
        results = json.loads(path.read_text())
        results.setdefault("variants", {})[args.variant] = {
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings, "seeds": list(runs),
            "test": summary, "runs": runs, "total_seconds": time.perf_counter() - started}
        write_json(path, results)
        print(f"wrote {path} (variants.{args.variant})")
        return
    save("sasrec", {"model": LABEL, "split": "test", "protocol": PROTOCOL, "settings": settings,
                    "seeds": list(runs), "test": summary, "runs": runs,
                    "total_seconds": time.perf_counter() - started,
                    **({"within_basket_next_item": earlier} if earlier else {})})


if __name__ == "__main__":
    show_progress()
    main()
