"""The server's run folder: config, per-round global adapters, metrics, privacy claims, final teacher.

    RUN/config.json                  the run's flat configuration
    RUN/state.json                   last completed round (written last, atomically)
    RUN/rounds/round-0001.npz        global adapters (+ FedAdam moments) after each round
    RUN/metrics.json                 one record per round: regions, losses, metrics, bytes
    RUN/privacy.json                 each region's latest claim: cumulative ε, δ, ledger head hash
    RUN/final/                       the federated teacher (adapters + teacher.json)

A round is complete only once state.json names it, so a crash mid-write repeats the round
instead of applying an update twice.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrec.atomic import atomic_file, write_json
from fedrec.errors import FedrecError

State = dict[str, np.ndarray]
MOMENT_PREFIX = "__moment__/"


@dataclass
class RunFolder:
    root: Path
    history: list[dict] = field(default_factory=list)
    claims: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, config: dict, resume: bool) -> "RunFolder":
        root = Path(root)
        state = root / "state.json"
        if state.exists() and not resume:
            raise FedrecError(f"{root} already holds a run",
                              hint="Pass --resume to continue it, or choose a new --run-dir.")
        root.mkdir(parents=True, exist_ok=True)
        run = cls(root)
        if state.exists():
            run.history = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").exists() else []
            run.history = [h for h in run.history if h["round"] <= run.last_round()]
            run.claims = json.loads((root / "privacy.json").read_text()) if (root / "privacy.json").exists() else {}
        write_json(root / "config.json", config)
        return run

    def last_round(self) -> int:
        path = self.root / "state.json"
        return json.loads(path.read_text())["last_round"] if path.exists() else 0

    def load_round(self, server_round: int) -> tuple[State, dict[str, State]]:
        with np.load(self.root / "rounds" / f"round-{server_round:04d}.npz") as data:
            arrays = {k: data[k] for k in data.files}
        adapters = {k: v for k, v in arrays.items() if not k.startswith(MOMENT_PREFIX)}
        moments: dict[str, State] = {}
        for key, value in arrays.items():
            if key.startswith(MOMENT_PREFIX):
                which, _, name = key[len(MOMENT_PREFIX):].partition("/")
                moments.setdefault(which, {})[name] = value
        return adapters, moments

    def complete_round(self, server_round: int, adapters: State, moments: dict[str, State],
                       record: dict, claims: dict[str, dict]) -> None:
        """Checkpoint, metrics and claims first; state.json last marks the round complete."""
        arrays = dict(adapters)
        for which, values in moments.items():
            arrays.update({f"{MOMENT_PREFIX}{which}/{k}": v for k, v in values.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_file(self.root / "rounds" / f"round-{server_round:04d}.npz", "wb") as handle:
            handle.write(buffer.getvalue())
        self.history.append(record)
        self.claims.update(claims)
        write_json(self.root / "metrics.json", self.history)
        write_json(self.root / "privacy.json", self.claims)
        write_json(self.root / "state.json", {"last_round": server_round})
