"""What a region does in a round, independent of Flower: train on its own silo (with DP unless
its operator opted out), record the spend, evaluate on its own users, keep a copy of each update."""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedrec.atomic import atomic_file
from fedrec.config import FedrecConfig
from fedrec.data.silo import Silo, UserRecord, load_silo
from fedrec.errors import FedrecError
from fedrec.faults import freeze_point
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.model.teacher import Teacher, initial_tower_state, pick_device, save_checkpoint
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.dp_sgd import train_private
from fedrec.privacy.claims import PrivacyClaim
from fedrec.privacy.plan import DPPlan
from fedrec.privacy.spend import RegionPrivacy
from fedrec.training.objective import RetrievalObjective, can_train, query_vectors
from fedrec.training.trainer import make_optimizer, train_epochs

log = logging.getLogger(__name__)

State = dict[str, np.ndarray]


def default_state_dir(silo_dir: str | Path) -> Path:
    """Beside the region's data, so every run on the same users (client, simulate, demo)
    spends from one ledger: the budget belongs to the data, not to a run."""
    return Path(silo_dir) / ".fedrec"


@dataclass
class RegionSettings:
    """Set by the region's operator (its SuperNode's node config), never by the server."""

    region: str
    data: str                       # the region's silo folder (OUT/<region> of `fedrec data prepare`)
    state_dir: str                  # the region's own records: ledger, copies of sent updates
    budget: RegionBudget

    def node_config(self) -> dict:
        """What the region's SuperNode is started with (`from_node_config` reads it back)."""
        return {"region": self.region, "data": str(Path(self.data).resolve()),
                "state_dir": str(Path(self.state_dir).resolve()), **self.budget.node_config()}

    @classmethod
    def from_node_config(cls, node_config: dict) -> "RegionSettings":
        missing = [k for k in ("region", "data") if not str(node_config.get(k, "")).strip()]
        if missing:
            raise FedrecError(f"node config lacks {', '.join(missing)}",
                              hint="Start the SuperNode with `fedrec client --region NAME --data DIR`.")
        data = str(node_config["data"])
        state_dir = str(node_config.get("state_dir", "")) or str(default_state_dir(data))
        return cls(str(node_config["region"]), data, state_dir, RegionBudget.from_node_config(node_config))

    def silo(self) -> Silo:
        return load_silo(self.data)


@dataclass
class RoundResult:
    status: str                                  # "trained" | "declined"
    adapters: State | None
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, str | bool | float] = field(default_factory=dict)


def build_teacher(config: FedrecConfig, adapters: State, silo: Silo, settings: RegionSettings) -> Teacher:
    teacher = Teacher(config.model, silo.catalog, Path(settings.state_dir) / "cache").to(pick_device())
    teacher.load_adapter_state(adapters)
    return teacher


def proximal_term(teacher: Teacher, anchor: State, mu: float):
    """FedProx: mu/2 · ||w − w_global||², pulling local adapters towards the global ones."""
    params = teacher.adapter_parameters()
    anchors = {k: torch.as_tensor(v, device=teacher.device) for k, v in anchor.items()}
    return lambda: 0.5 * mu * sum(((params[k] - anchors[k]) ** 2).sum() for k in params)


def train_round(settings: RegionSettings, config: FedrecConfig, adapters: State,
                server_round: int, run: str, catalog_fingerprint: str) -> RoundResult:
    """One local round; under DP the round runs inside `RegionPrivacy.round`, so its ledger
    entry is fsync'd before the update (with the claim only that entry gives) is returned.
    `catalog_fingerprint` is the coordinator's catalog: item vectors are rows of it, so a region
    with another catalog must not train."""
    silo = settings.silo()
    if silo.catalog.fingerprint != catalog_fingerprint:
        raise FedrecError(f"region {settings.region}: its catalog ({silo.catalog.fingerprint[:12]}…) is not the "
                          f"coordinator's ({catalog_fingerprint[:12]}…)",
                          hint="Prepare every region's silo from the same public catalog as the server's --catalog.")
    started = time.perf_counter()
    users = [u for u in silo.users if can_train(u)]
    fed, label = config.federation, f"{settings.region} round {server_round}"
    info: dict = {"region": settings.region, "dp": settings.budget.enabled}
    if not settings.budget.enabled:
        teacher, loss = local_training(settings, silo, config, adapters, server_round, users, None)
    else:
        privacy = RegionPrivacy(settings.region, settings.budget, settings.state_dir)
        with privacy.round(len(users), config.train.batch_size, fed.local_epochs, fed.rounds, run, server_round,
                           timeout=fed.round_timeout) as spend:           # the server waits no longer
            info["epsilon"] = spend.decision.spent_epsilon
            if not spend.allowed:
                return RoundResult("declined", None, {"num_examples": 0}, {**info, "reason": spend.decision.reason})
            teacher, loss = local_training(settings, silo, config, adapters, server_round, users, spend.plan)
        info.update(spend.claim().to_json(), noise_multiplier=spend.entry.noise_multiplier)
        freeze_point("after-ledger", label)
    new_adapters = teacher.adapter_state()
    keep_sent_update(settings, run, server_round, new_adapters, len(users))
    metrics = {"num_examples": len(users), "train_seconds": time.perf_counter() - started}
    if loss is not None:            # under DP the loss on sampled users is private: it stays here
        metrics["train_loss"] = loss
    return RoundResult("trained", new_adapters, metrics, info)


def local_training(settings: RegionSettings, silo: Silo, config: FedrecConfig, adapters: State, server_round: int,
                   users: list[UserRecord], plan: DPPlan | None) -> tuple[Teacher, float | None]:
    """The tower trained on the region's users from the global adapters: DP-SGD on `plan`, or
    without DP when there is none (then with its training loss)."""
    fed = config.federation
    seed = config.train.seed + 1000 * server_round + zlib.crc32(settings.region.encode())   # DP draws its own
    torch.manual_seed(seed)
    label = f"{settings.region} round {server_round}"
    freeze_point("before-training", label)
    teacher = build_teacher(config, adapters, silo, settings)
    objective = RetrievalObjective(teacher.tower)
    queries = query_vectors(teacher, users)        # the region's searches: encoded here, never sent
    regulariser = proximal_term(teacher, adapters, fed.proximal_mu) if fed.strategy == "fedprox" else None
    if plan is not None:
        train_private(objective, users, config.train, plan, label, regulariser, queries=queries)
        return teacher, None
    losses = train_epochs(objective, make_optimizer(objective, config.train), users, config.train,
                          fed.local_epochs, np.random.default_rng(seed), label, regulariser, queries=queries)
    return teacher, float(losses[-1])


def evaluate_round(settings: RegionSettings, config: FedrecConfig, adapters: State,
                   splits: list[str]) -> dict[str, float]:
    """Full-ranking metrics of the global adapters on this region's own users."""
    silo = settings.silo()
    teacher = build_teacher(config, adapters, silo, settings)
    ranker = TeacherRanker(teacher, config.train.eval_batch_size)
    out = {}
    for split in splits:
        result = evaluate_ranker(ranker, {settings.region: silo}, split)[settings.region]
        out.update({f"{split}_{k}": float(v) for k, v in result.items()})
    return out


def sent_update_path(state_dir: str | Path, run: str, server_round: int) -> Path:
    return Path(state_dir) / "sent" / run / f"round-{server_round:04d}.npz"


def keep_sent_update(settings: RegionSettings, run: str, server_round: int, adapters: State,
                     num_examples: int) -> Path:
    """The region's own copy of what it sent, so it can check what the server did with it."""
    path = sent_update_path(settings.state_dir, run, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as handle:
        np.savez(handle, __num_examples__=np.array(num_examples), **adapters)
    return path


def train_alone(settings: RegionSettings, config: FedrecConfig, out: str | Path) -> Path:
    """`fedrec train --dp`: the region trains the tower on its own data under DP for
    `federation.rounds` rounds, exactly as in a federation but with no one to average with,
    spending from the same ledger; the checkpoint claims the last entry."""
    if not settings.budget.enabled:
        raise FedrecError("train_alone is the DP path; train without DP with `fedrec train` (no --dp)")
    out = Path(out)
    silo = settings.silo()
    run = f"train-{out.resolve().name}-{uuid.uuid4().hex[:12]}"
    torch.manual_seed(config.train.seed)
    adapters = initial_tower_state(config.model, silo.catalog)
    trained: list[RoundResult] = []
    for server_round in range(1, config.federation.rounds + 1):
        outcome = train_round(settings, config, adapters, server_round, run, silo.catalog.fingerprint)
        if outcome.status == "declined":
            log.warning(str(outcome.info["reason"]))
            break
        adapters = outcome.adapters
        trained.append(outcome)
        log.info(f"round {server_round}/{config.federation.rounds}: lifetime ε {outcome.info['epsilon']:.3f} "
                 f"of {settings.budget.epsilon:g}")
    if not trained:
        raise FedrecError(f"region {settings.region} trained no round: nothing to save")
    claim = PrivacyClaim.parse(trained[-1].info, "the last round")
    return save_checkpoint(out, config.model, adapters, silo.catalog,
                           {"run_id": run, "rounds": len(trained), "privacy": {settings.region: claim.to_json()}})
