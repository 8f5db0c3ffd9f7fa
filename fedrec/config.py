"""One typed configuration for every stage; the single source of truth for defaults.

Sections are dataclasses whose fields carry their meaning and range (`setting`), shown by
`fedrec config show` and checked on load. `FedrecConfig.from_flat` / `to_flat` map them to the flat
`section.key = value` form used by TOML files, Flower run configs and the CLI's `--set`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedrec.errors import FedrecError


def setting(default: Any, meaning: str, *, at_least: float | None = None, above: float | None = None,
            below: float | None = None) -> Any:
    """A field with what it means (`fedrec config show`) and the values it accepts, checked on load."""
    return field(default=default, metadata={"meaning": meaning, "at least": at_least, "above": above,
                                            "below": below})


RULES = {"at least": operator.ge, "above": operator.gt, "below": operator.lt}     # setting's bounds


@dataclass
class ModelConfig:
    """The teacher: a frozen pretrained text encoder gives items and queries their meaning; a small
    collaborative tower over item vectors (the only part that trains and travels) makes it accurate."""

    encoder: str = setting("", 'a Hugging Face encoder directory; "" = bundled all-MiniLM-L6-v2')
    dim: int = setting(64, "item and user vector size", at_least=1)
    heads: int = setting(2, "attention-pooling heads of the user tower", at_least=1)
    history_items: int = setting(50, "most recent items the user tower reads, newest first", at_least=1)
    max_age: int = setting(16, "basket ages (0 = most recent basket) beyond this share one embedding",
                           at_least=0)
    temperature: float = setting(0.05, "softmax temperature of the retrieval loss", above=0)
    search_behaviour: float = setting(0.1, "weight of the tower's behavioural score in search (0: text alone)",
                                      at_least=0)
    item_ids: bool = setting(True, "a learnt per-item vector beside the text one (collaborative signal)")
    item_text: bool = setting(True, "the encoder's text vector of each item (meaning, cold start)")
    max_item_tokens: int = setting(32, "encoder tokens read of each item's text", at_least=1)
    max_query_tokens: int = setting(32, "encoder tokens read of each search query", at_least=1)


@dataclass
class TrainConfig:
    """Local optimisation; shared by central training and by each region in a federation."""

    epochs: int = setting(10, "central training: a cosine schedule over them, early-stopped", at_least=1)
    batch_size: int = setting(512, "users per step (under DP: the expected Poisson batch)", at_least=1)
    lr: float = setting(2e-3, "AdamW learning rate of the tower", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least=0)
    dp_shared_scale: float = setting(0.1, "DP-SGD: each user's gradient of the tower's shared parameters (pooling, "
                                     "basket ages) is scaled by this before clipping, leaving the clip norm to the "
                                     "item parameters (Adam's per-coordinate step undoes the scale)", above=0)
    dp_examples_per_user: int = setting(1, "DP-SGD: a sampled user's gradient is the mean over this many of their "
                                        "baskets and searches (all, if fewer): more of one user's data per step at "
                                        "no privacy cost, for as many times the compute", at_least=1)
    max_targets: int = setting(64, "target-basket items per example (a random subset beyond)", at_least=1)
    patience: int = setting(3, "epochs without validation NDCG@10 gain before stopping", at_least=1)
    eval_batch_size: int = setting(1024, "users scored at once in validation and evaluation", at_least=1)
    seed: int = setting(0, "seed of shuffling and initialisation (DP noise and sampling draw on OS entropy)",
                        at_least=0)


@dataclass
class FederationConfig:
    """The server's plan. A region's privacy budget is NOT here: regions set it on their side."""

    rounds: int = setting(3, "federated rounds", at_least=1)
    local_epochs: float = setting(1.0, "expected passes over a region's users per round (may be < 1)", above=0)
    min_regions: int = setting(1, "fewer successful replies than this fails the round", at_least=1)
    strategy: str = setting("fedavg", "fedavg | fedprox | fedadam | fedmedian | trimmed_mean")
    proximal_mu: float = setting(0.01, "fedprox: weight of the proximal term", at_least=0)
    server_lr: float = setting(0.01, "fedadam: the server's learning rate", above=0)
    server_beta1: float = setting(0.9, "fedadam: decay of the first moment", at_least=0, below=1)
    server_beta2: float = setting(0.99, "fedadam: decay of the second moment", at_least=0, below=1)
    server_tau: float = setting(1e-3, "fedadam: adaptivity (added to the root of the second moment)", above=0)
    clip_update_norm: float = setting(0.0, "server-side bound on each region's update norm; 0 = off", at_least=0)
    trim_fraction: float = setting(0.2, "trimmed_mean: share of regions dropped at each end", at_least=0,
                                   below=0.5)
    round_timeout: float = setting(900.0, "seconds to wait for the regions' replies", above=0)
    wait_for_regions: float = setting(300.0, "seconds to wait for min_regions to connect", above=0)
    evaluate_every: int = setting(1, "rounds between evaluations on the regions' own users (0 = never)",
                                  at_least=0)
    eval_splits: str = setting("val,test", "the splits those evaluations use")
    run_dir: str = setting("", "the server's run folder (set by `fedrec server`)")
    catalog: str = setting("", "the public catalog the regions share (set by `fedrec server`)")
    resume: bool = setting(False, "continue the run in run_dir from its last round")


@dataclass
class DistillConfig:
    """The student that stands in for the teacher's encoder after export (public inputs only)."""

    layers: int = setting(2, "transformer layers of the student", at_least=1)
    hidden: int = setting(128, "the student's hidden size (a multiple of heads)", at_least=1)
    heads: int = setting(4, "the student's attention heads", at_least=1)
    intermediate: int = setting(512, "the student's feed-forward size", at_least=1)
    vocab_reserve: int = setting(1000, "extra common whole words kept beyond the catalog's", at_least=0)
    queries_per_item: int = setting(4, "title fragments used as search queries", at_least=0)
    epochs: int = setting(20, "distillation epochs, early-stopped", at_least=1)
    batch_size: int = setting(64, "texts per step", at_least=1)
    lr: float = setting(2e-3, "AdamW learning rate of the student", above=0)
    candidates: int = setting(64, "random catalog items per batch for the listwise loss", at_least=1)
    hard_candidates: int = setting(3, "plus each text's top items under the teacher", at_least=0)
    kl_weight: float = setting(1.0, "weight of the listwise (KL) loss beside the cosine one", at_least=0)
    patience: int = setting(3, "epochs without search-overlap gain before stopping", at_least=1)
    seed: int = setting(0, "seed of sampling and initialisation", at_least=0)


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
        """Apply `section.key` overrides, converting each value to the field's declared type and
        refusing one outside the field's range."""
        config = dataclasses.replace(base) if base else cls()
        sections = {f.name: dataclasses.replace(getattr(config, f.name)) for f in dataclasses.fields(cls)}
        for key, value in values.items():
            section_name, _, name = key.partition(".")
            section = sections.get(section_name)
            fields = {f.name: f for f in dataclasses.fields(section)} if section is not None else {}
            if name not in fields:
                known = ", ".join(sorted(config.to_flat()))
                raise FedrecError(f"unknown setting {key!r}; known settings: {known}",
                                  hint="`fedrec config show` lists them with their meaning.")
            kind = typing.get_type_hints(type(section))[name]
            setattr(section, name, _checked(key, _coerce(key, value, kind), fields[name].metadata))
        distill = sections["distill"]
        if distill.hidden % distill.heads:
            raise FedrecError(f"setting 'distill.hidden' must be a multiple of 'distill.heads', got "
                              f"{distill.hidden} and {distill.heads}")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> "FedrecConfig":
        """Defaults, then a TOML file ([model], [train] tables), then `overrides`."""
        config = cls()
        if path:
            try:
                tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:           # TOMLDecodeError and UnicodeDecodeError included
                raise FedrecError(f"cannot read config {path}: {exc}") from exc
            loose = [name for name, table in tables.items() if not isinstance(table, dict)]
            if loose:
                raise FedrecError(f"config {path}: {loose[0]!r} is not in a table",
                                  hint="Put each setting under its section, e.g. [train] then lr = 0.001.")
            flat = {f"{s}.{k}": v for s, table in tables.items() for k, v in table.items()}
            try:
                config = cls.from_flat(flat, config)
            except FedrecError as exc:
                raise FedrecError(f"config {path}: {exc}") from None
        return cls.from_flat(overrides or {}, config)

    def describe(self) -> str:
        """Every setting with its value, its default where it differs, what it means and the values
        it accepts: what `fedrec config show` prints."""
        defaults = FedrecConfig().to_flat()
        lines = []
        for section in dataclasses.fields(self):
            for item in dataclasses.fields(getattr(self, section.name)):
                key = f"{section.name}.{item.name}"
                value = getattr(getattr(self, section.name), item.name)
                bounds = " and ".join(f"{rule} {bound:g}" for rule in RULES
                                      if (bound := item.metadata[rule]) is not None)
                notes = [f"default {defaults[key]!r}" if value != defaults[key] else "",
                         bounds and f"must be {bounds}"]
                lines.append(f"{key:<29} {value!r:<12} {item.metadata['meaning']}"
                             + "".join(f"; {note}" for note in notes if note))
        return "\n".join(lines)


def _checked(key: str, value: Any, metadata: Mapping[str, Any]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise FedrecError(f"setting {key!r} must be a finite number, got {value!r}")
    for rule, holds in RULES.items():
        bound = metadata[rule]
        if bound is not None and not holds(value, bound):
            raise FedrecError(f"setting {key!r} must be {rule} {bound:g}, got {value!r}")
    return value


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
    except (TypeError, ValueError, OverflowError):
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
