"""Server-side aggregation of regional adapter updates. Plain numpy, no Flower types.

Every strategy sees the same thing: the global adapters sent this round and, per region, the
adapters it returned with its example count. Optional clipping bounds each region's influence
(its update norm) before aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedrec.config import FederationConfig
from fedrec.errors import FedrecError

State = dict[str, np.ndarray]


@dataclass
class RegionUpdate:
    region: str
    adapters: State
    num_examples: int


def update_norm(delta: State) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def clipped_delta(update: RegionUpdate, global_state: State, max_norm: float) -> tuple[State, float]:
    """The region's change to the global adapters, scaled down to `max_norm` (0 = unbounded)."""
    delta = {k: update.adapters[k].astype(np.float64) - global_state[k] for k in global_state}
    norm = update_norm(delta)
    if not np.isfinite(norm):
        raise FedrecError(f"region {update.region} sent a non-finite update")
    if max_norm and norm > max_norm:
        delta = {k: v * (max_norm / norm) for k, v in delta.items()}
    return delta, norm


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed_mean")


def robust_mean(deltas: list[np.ndarray], trim: int) -> np.ndarray:
    """Coordinate-wise mean after dropping the `trim` lowest and highest values (median if none remain)."""
    stacked = np.sort(np.stack(deltas), axis=0)
    if len(deltas) - 2 * trim <= 0:
        return np.median(stacked, axis=0)
    return stacked[trim:len(deltas) - trim].mean(axis=0)


@dataclass
class Aggregator:
    """FedAvg (example-weighted mean), FedProx (same server rule), FedAdam (adaptive server step),
    or a robust rule that bounds what one region can do: FedMedian, trimmed mean."""

    config: FederationConfig
    moments: dict[str, State] = field(default_factory=dict)   # FedAdam's m and v; saved for resume

    def __post_init__(self):
        if self.config.strategy not in STRATEGIES:
            raise FedrecError(f"unknown strategy {self.config.strategy!r}; choose one of {', '.join(STRATEGIES)}")

    def aggregate(self, global_state: State, updates: list[RegionUpdate]) -> tuple[State, dict[str, float]]:
        """New global adapters and each region's (pre-clipping) update norm."""
        total = sum(u.num_examples for u in updates)
        if total <= 0:
            raise FedrecError("no region reported any training examples this round")
        mean_delta = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_state.items()}
        norms, deltas = {}, []
        for update in updates:
            delta, norms[update.region] = clipped_delta(update, global_state, self.config.clip_update_norm)
            deltas.append(delta)
            weight = update.num_examples / total
            for k in mean_delta:
                mean_delta[k] += weight * delta[k]
        if self.config.strategy in ("fedmedian", "trimmed_mean"):
            trim = len(deltas) if self.config.strategy == "fedmedian" else int(self.config.trim_fraction * len(deltas))
            mean_delta = {k: robust_mean([d[k] for d in deltas], trim) for k in global_state}
        if self.config.strategy == "fedadam":
            mean_delta = self._adam_step(mean_delta)
        new_state = {k: (global_state[k] + mean_delta[k]).astype(global_state[k].dtype) for k in global_state}
        return new_state, norms

    def _adam_step(self, pseudo_gradient: State) -> State:
        cfg = self.config
        m = self.moments.setdefault("m", {k: np.zeros_like(v) for k, v in pseudo_gradient.items()})
        v = self.moments.setdefault("v", {k: np.zeros_like(g) for k, g in pseudo_gradient.items()})
        step = {}
        for k, g in pseudo_gradient.items():
            m[k] = cfg.server_beta1 * m[k] + (1 - cfg.server_beta1) * g
            v[k] = cfg.server_beta2 * v[k] + (1 - cfg.server_beta2) * g * g
            step[k] = cfg.server_lr * m[k] / (np.sqrt(v[k]) + cfg.server_tau)
        return step
