"""One typed configuration for every stage; the single source of truth for defaults.

Sections are dataclasses. `FedrecConfig.from_flat` / `to_flat` map them to the flat
`section.key = value` form used by TOML files, Flower run configs and the CLI's `--set`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedrec.errors import FedrecError


@dataclass
class ModelConfig:
    """The teacher: a frozen pretrained text encoder gives items and queries their meaning; a small
    collaborative tower over item vectors (the only part that trains and travels) makes it accurate."""

    encoder: str = ""                      # a Hugging Face encoder directory; "" = bundled all-MiniLM-L6-v2
    dim: int = 64                          # item and user vector size
    heads: int = 2                         # attention-pooling heads of the user tower
    history_items: int = 50                # most recent items the user tower reads, newest first
    max_age: int = 16                      # basket ages (0 = most recent basket) beyond this share one embedding
    temperature: float = 0.05              # softmax temperature of the retrieval loss
    search_behaviour: float = 0.1          # weight of the tower's behavioural score in search (0: text alone)
    item_ids: bool = True                  # a learnt per-item vector beside the text one (collaborative signal)
    item_text: bool = True                 # the encoder's text vector of each item (meaning, cold start)
    max_item_tokens: int = 32
    max_query_tokens: int = 32


@dataclass
class TrainConfig:
    """Local optimisation; shared by central training and by each region in a federation."""

    epochs: int = 10                       # central training: a cosine schedule over them, early-stopped
    batch_size: int = 512                  # users per step (under DP: the expected Poisson batch)
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_targets: int = 64                  # target-basket items per example (a random subset beyond)
    patience: int = 3                      # epochs without validation NDCG@10 gain before stopping
    eval_batch_size: int = 1024
    seed: int = 0


@dataclass
class FederationConfig:
    """The server's plan. A region's privacy budget is NOT here: regions set it on their side."""

    rounds: int = 3
    local_epochs: float = 1.0              # expected passes over a region's users per round (may be < 1)
    min_regions: int = 1                   # fewer successful replies than this fails the round
    strategy: str = "fedavg"               # fedavg | fedprox | fedadam | fedmedian | trimmed_mean
    proximal_mu: float = 0.01              # fedprox: weight of the proximal term
    server_lr: float = 0.01                # fedadam
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    clip_update_norm: float = 0.0          # server-side bound on each region's update norm; 0 = off
    trim_fraction: float = 0.2             # trimmed_mean: share of regions dropped at each end
    round_timeout: float = 900.0           # seconds to wait for the regions' replies
    wait_for_regions: float = 300.0        # seconds to wait for min_regions to connect
    evaluate_every: int = 1                # rounds between evaluations on the regions' own users (0 = never)
    eval_splits: str = "val,test"
    run_dir: str = ""                      # the server's run folder (set by `fedrec server`)
    catalog: str = ""                      # the public catalog the regions share (set by `fedrec server`)
    resume: bool = False                   # continue the run in run_dir from its last round


@dataclass
class DistillConfig:
    """The student that stands in for the teacher's encoder after export (public inputs only)."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    vocab_reserve: int = 1000              # extra common whole words kept beyond the catalog's
    queries_per_item: int = 4              # title fragments used as search queries
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    candidates: int = 64                   # random catalog items per batch for the listwise loss
    hard_candidates: int = 3               # plus each text's top items under the teacher
    kl_weight: float = 1.0
    patience: int = 3
    seed: int = 0


@dataclass
class FedrecConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_flat(self) -> dict[str, Any]:
        return {
            f"{section.name}.{item.name}": getattr(getattr(self, section.name), item.name)
            for section in dataclasses.fields(self)
            for item in dataclasses.fields(getattr(self, section.name))
        }

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], base: "FedrecConfig | None" = None) -> "FedrecConfig":
        """Apply `section.key` overrides, converting each value to the field's declared type."""
        config = dataclasses.replace(base) if base else cls()
        sections = {f.name: dataclasses.replace(getattr(config, f.name)) for f in dataclasses.fields(cls)}
        for key, value in values.items():
            section_name, _, name = key.partition(".")
            section = sections.get(section_name)
            hints = typing.get_type_hints(type(section)) if section is not None else {}
            if name not in hints:
                known = ", ".join(sorted(config.to_flat()))
                raise FedrecError(f"unknown setting {key!r}; known settings: {known}")
            setattr(section, name, _coerce(key, value, hints[name]))
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> "FedrecConfig":
        """Defaults, then a TOML file ([model], [train] tables), then `overrides`."""
        config = cls()
        if path:
            try:
                tables = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise FedrecError(f"cannot read config {path}: {exc}") from exc
            flat = {f"{s}.{k}": v for s, table in tables.items() for k, v in dict(table).items()}
            config = cls.from_flat(flat, config)
        return cls.from_flat(overrides or {}, config)


def _coerce(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise FedrecError(f"setting {key!r} expects {kind.__name__}, got {value!r}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`["train.lr=0.01", ...]` from the CLI's repeated `--set` option."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FedrecError(f"--set expects section.key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
