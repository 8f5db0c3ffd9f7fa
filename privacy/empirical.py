"""`fedrec audit --empirical`: a one-run audit (Steinke, Nasr & Jagielski 2023) measuring a lower
bound on ε beside the accounted one.

m canary users (synthetic histories over the public catalog, `canaries.py`) are each included by
an independent fair coin and trained inside the region's DP-SGD exactly like its real users, at
the region's real settings; the tower's memory of each canary (`canary_losses`) ranks them, the
k₊ highest are guessed in, the k₋ lowest out (k₊ = k₋ = half of GUESS_SHARE·m, fixed before any
run), and the right guesses become a lower bound on ε at a stated confidence (`one_run_bound.py`).
A lower bound above the accounted ε means the implementation leaks more than the accountant says.

The audit trains its own scratch tower and keeps nothing of it: no checkpoint, no update leaves.
It used the region's real users, so it spends from the region's real ledger, through the normal
plan → train → record path (`RegionPrivacy.round`), as a run named audit-…; a budget that
cannot afford it refuses.

The noise-off control (clipping only) has no finite ε to spend, so it trains the canaries among
synthetic fill-in users, as many as the region has, instead of the real ones: it shows what the
scoring can find when nothing hides the canaries, and spends nothing.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedrec.config import FedrecConfig
from fedrec.data.silo import Silo, load_silo
from fedrec.errors import FedrecError
from fedrec.model.teacher import Teacher, initial_tower_state, pick_device
from fedrec.privacy.accountant import opacus_epsilon
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.canaries import canary_losses, make_canaries
from fedrec.privacy.dp_sgd import poisson_sample, train_private
from fedrec.privacy.one_run_bound import bound_ceiling, epsilon_lower_bound
from fedrec.privacy.plan import DPPlan, round_shape
from fedrec.privacy.spend import RegionPrivacy
from fedrec.training.objective import RetrievalObjective, can_train, query_vectors

log = logging.getLogger(__name__)

AUDIT_RUN_PREFIX = "audit-"
DEFAULT_CANARIES = 200
GUESS_SHARE = 0.2           # guesses on a fifth of the canaries: half of them in, half out
CONFIDENCE = 0.95
FILLER_PREFIX = "audit filler "

Sampler = Callable[[np.random.Generator, int, float], np.ndarray]


@dataclass(frozen=True)
class EmpiricalAudit:
    """One region's one-run audit: the accounted ε beside the lower bound the canaries show."""

    region: str
    control: str                # "dp" (the region's DP training) or "noise-off" (clipping only)
    run: str                    # the ledger run of the audit's spend; "" when it spent nothing
    accounted_epsilon: float    # ε of the training the canaries went through; inf with noise off
    lifetime_epsilon: float     # the region's cumulative ε after the audit
    delta: float
    canaries: int               # m
    included: int               # canaries whose coin put them in the training
    guesses: int                # k₊ + k₋ (the rest abstain)
    correct: int
    confidence: float
    lower_bound: float          # ε the training is shown to exceed, at `confidence`
    ceiling: float              # the bound were every guess right: the most this m and k can show
    users: int                  # who trained: real (or fill-in) users and the included canaries
    sample_rate: float
    steps: int
    noise_multiplier: float
    seconds: float

    @property
    def ok(self) -> bool:
        """False when the implementation is shown to leak more than it accounts for."""
        return self.lower_bound <= self.accounted_epsilon

    def to_json(self) -> dict:
        fields = asdict(self)
        if math.isinf(self.accounted_epsilon):
            fields["accounted_epsilon"] = None          # JSON has no infinity: no finite ε was accounted
        return {**fields, "ok": self.ok}


def guess_count(canaries: int) -> int:
    return max(2, round(GUESS_SHARE * canaries))


def score_guesses(scores: np.ndarray, included: np.ndarray, guesses: int,
                  rng: np.random.Generator) -> int:
    """Right guesses among the k₊ = ⌊guesses/2⌋ highest scores guessed in and the k₋ = the rest
    lowest guessed out; ties fall in a random order."""
    shuffled = rng.permutation(len(scores))
    ranked = shuffled[np.argsort(-scores[shuffled], kind="stable")]
    guessed_in, guessed_out = ranked[:guesses // 2], ranked[len(ranked) - (guesses - guesses // 2):]
    return int(included[guessed_in].sum() + (~included[guessed_out]).sum())


def empirical_audit(region: str, silo: Silo, budget: RegionBudget, state_dir: str | Path,
                    config: FedrecConfig, canaries: int = DEFAULT_CANARIES, guesses: int | None = None,
                    confidence: float = CONFIDENCE, noise: bool = True, sampler: Sampler = poisson_sample,
                    lock_timeout: float | None = None) -> EmpiricalAudit:
    """Trains a scratch tower for federation.rounds × federation.local_epochs expected passes
    (one ledger entry) with the canaries, and bounds ε from them. `noise=False` is the
    noise-off control; `sampler` is for the broken-sampler control alone."""
    started = time.perf_counter()
    guesses = guess_count(canaries) if guesses is None else guesses
    if canaries < 2 or not 2 <= guesses <= canaries:
        raise FedrecError(f"an empirical audit needs at least 2 canaries and 2 ≤ guesses ≤ canaries; got "
                          f"{canaries} canaries and {guesses} guesses")
    if not 0 < confidence < 1:
        raise FedrecError(f"confidence must lie in (0, 1), got {confidence}")
    if not budget.enabled:
        raise FedrecError(f"region {region} trains without DP: there is no accounted ε to audit")
    real = [user for user in silo.users if can_train(user)]
    if not real:
        raise FedrecError(f"region {region} has no users with training data: nothing to audit")
    rng = np.random.default_rng(secrets.randbits(128))
    catalog_items = len(silo.catalog)
    canary_users = make_canaries(catalog_items, canaries, rng)
    included = rng.random(canaries) < 0.5
    population = real if noise else make_canaries(catalog_items, len(real), rng, FILLER_PREFIX)
    training = population + [user for user, inside in zip(canary_users, included) if inside]

    torch.manual_seed(config.train.seed)        # the start every region's training takes
    start = initial_tower_state(config.model, silo.catalog)
    teacher = Teacher(config.model, silo.catalog, Path(state_dir) / "cache").to(pick_device())
    teacher.load_adapter_state(start)
    objective = RetrievalObjective(teacher.tower)
    queries = query_vectors(teacher, training)       # the region's searches, as its training encodes them
    passes = config.federation.rounds * config.federation.local_epochs
    privacy = RegionPrivacy(region, budget, state_dir)
    label = f"{region} audit" + ("" if noise else " (noise off)")
    if noise:
        run = f"{AUDIT_RUN_PREFIX}{uuid.uuid4().hex[:12]}"
        with privacy.round(len(training), config.train.batch_size, passes, 1, run, 1, lock_timeout) as spend:
            if not spend.allowed:           # raising inside the block records nothing
                raise FedrecError(f"{spend.decision.reason}: the empirical audit trains on the region's users "
                                  "and spends like a training run, so it is refused",
                                  hint="Audit a region that has budget left (or raise its lifetime ε knowingly).")
            plan = spend.plan
            train_private(objective, training, config.train, plan, label, queries=queries, sampler=sampler)
        accounted = opacus_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)], budget.delta,
                                   budget.accountant)
        lifetime = spend.entry.epsilon
    else:
        run, accounted, lifetime = "", math.inf, privacy.spent()
        sample_rate, steps = round_shape(len(training), config.train.batch_size, passes)
        plan = DPPlan(len(training), sample_rate, steps, 0.0, budget.max_grad_norm)
        train_private(objective, training, config.train, plan, label, queries=queries, sampler=sampler)
    scores = -canary_losses(objective, canary_users, config.train.max_targets)     # remembered: a low loss
    correct = score_guesses(scores, included, guesses, rng)
    return EmpiricalAudit(
        region=region, control="dp" if noise else "noise-off", run=run, accounted_epsilon=accounted,
        lifetime_epsilon=lifetime, delta=budget.delta, canaries=canaries, included=int(included.sum()),
        guesses=guesses, correct=correct, confidence=confidence,
        lower_bound=epsilon_lower_bound(canaries, guesses, correct, budget.delta, confidence),
        ceiling=bound_ceiling(canaries, guesses, budget.delta, confidence), users=len(training),
        sample_rate=plan.sample_rate, steps=plan.steps, noise_multiplier=plan.noise_multiplier,
        seconds=time.perf_counter() - started)


def format_empirical(audits: list[EmpiricalAudit]) -> str:
    header = (f"{'region':<8}{'control':<11}{'ε accounted':>12}{'ε lower bound':>15}{'ceiling':>9}"
              f"{'canaries':>10}{'guesses':>9}{'right':>7}  status")
    lines = ["empirical audit (one run, Steinke, Nasr & Jagielski 2023)", header, "-" * len(header)]
    for a in audits:
        accounted = "∞ (no DP)" if math.isinf(a.accounted_epsilon) else f"{a.accounted_epsilon:.3f}"
        lines.append(f"{a.region:<8}{a.control:<11}{accounted:>12}{a.lower_bound:>15.3f}{a.ceiling:>9.3f}"
                     f"{a.canaries:>10}{a.guesses:>9}{a.correct:>7}  " + ("ok" if a.ok else "FAIL"))
        lines.append(f"    at {a.confidence:.0%} confidence, δ={a.delta:g}; {a.users} users trained "
                     f"({a.included} canaries in), q={a.sample_rate:.4f}, {a.steps} steps, σ={a.noise_multiplier:.3f}"
                     + (f"; spent as run {a.run}, lifetime ε now {a.lifetime_epsilon:.3f}" if a.run else
                        "; spent nothing (synthetic fill-in users)") + f"; {a.seconds:.0f} s")
        if not a.ok:
            lines.append(f"    ✗ the canaries show ε > {a.lower_bound:.3f}, above the accounted "
                         f"{a.accounted_epsilon:.3f}: the training leaks more than its ledger says")
    return "\n".join(lines)


def audit_regions(data: str | Path, regions: list[str], state_dirs: dict[str, Path], budget: RegionBudget,
                  config: FedrecConfig, canaries: int = DEFAULT_CANARIES, confidence: float = CONFIDENCE,
                  noise_off_control: bool = True) -> list[EmpiricalAudit]:
    """Each region's DP audit (spending from its ledger in `state_dirs`), then, if asked, its
    noise-off control."""
    audits = []
    for region in regions:
        silo = load_silo(Path(data) / region)
        log.info(f"empirical audit of {region}: {canaries} canaries, training at its DP settings (spends from "
                 f"{state_dirs[region]})")
        audits.append(empirical_audit(region, silo, budget, state_dirs[region], config, canaries,
                                      confidence=confidence))
        if noise_off_control:
            log.info(f"noise-off control of {region} (synthetic fill-in users, spends nothing)")
            audits.append(empirical_audit(region, silo, budget, state_dirs[region], config, canaries,
                                          confidence=confidence, noise=False))
    return audits
