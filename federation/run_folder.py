"""The server's run folder: config, per-round global adapters, metrics, privacy claims, final teacher.

    RUN/config.json                  the run's flat configuration
    RUN/run.json                     the run's id, unique across runs: what region ledgers record
    RUN/state.json                   last completed round (written last, atomically)
    RUN/rounds/round-0001.npz        global adapters (+ FedAdam moments) after each round
    RUN/metrics.json                 one record per round: regions, losses, metrics, bytes
    RUN/privacy.json                 claims for each region's last applied update, and per round the
                                     ledger head each applied update came with (RunClaims)
    RUN/final/                       the federated teacher (adapters + teacher.json)

A round is complete only once state.json names it, so a crash mid-write repeats the round
instead of applying an update twice.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrec.atomic import atomic_file, write_json
from fedrec.errors import FedrecError
from fedrec.privacy.claims import RUN_CLAIMS_FILE, PrivacyClaim, RunClaims

State = dict[str, np.ndarray]
MOMENT_PREFIX = "__moment__/"


RUN_FILE = "run.json"


@dataclass
class RunFolder:
    root: Path
    run_id: str = ""
    history: list[dict] = field(default_factory=list)
    privacy: RunClaims = field(default_factory=lambda: RunClaims("", {}, {}))

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
            run.run_id = read_run_id(root)
            run.history = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").exists() else []
            run.history = [h for h in run.history if h["round"] <= run.last_round()]
            claims = root / RUN_CLAIMS_FILE
            if claims.exists():
                run.privacy = RunClaims.parse(json.loads(claims.read_text()), str(claims))
        else:       # a region's ledger outlives runs: names like "demo" recur, ids must not
            run.run_id = f"{root.name}-{uuid.uuid4().hex[:12]}"
            write_json(root / RUN_FILE, {"run_id": run.run_id})
        run.privacy.run_id = run.run_id
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
                       record: dict, claims: dict[str, PrivacyClaim]) -> None:
        """Checkpoint, metrics and claims first; state.json last marks the round complete."""
        arrays = dict(adapters)
        for which, values in moments.items():
            arrays.update({f"{MOMENT_PREFIX}{which}/{k}": v for k, v in values.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_file(self.root / "rounds" / f"round-{server_round:04d}.npz", "wb") as handle:
            handle.write(buffer.getvalue())
        self.history.append(record)
        self.privacy.add_round(server_round, claims)
        write_json(self.root / "metrics.json", self.history)
        write_json(self.root / RUN_CLAIMS_FILE, self.privacy.to_json())
        write_json(self.root / "state.json", {"last_round": server_round})


def read_run_id(root: str | Path) -> str:
    path = Path(root) / RUN_FILE
    try:
        run_id = json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedrecError(f"{path}: cannot read the run id ({exc})",
                          hint="Restore run.json; the regions' ledgers name the run by it.") from exc
    if not isinstance(run_id, str) or not run_id:
        raise FedrecError(f"{path}: run_id must be a non-empty string")
    return run_id
