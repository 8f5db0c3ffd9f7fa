"""The Flower ServerApp: reads the run config and hands over to the coordinator."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import FedrecConfig
from fedrec.errors import FedrecError
from fedrec.federation.coordinator import Coordinator, log
from fedrec.federation.run_folder import RunFolder
from fedrec.model.teacher import Teacher

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FedrecConfig.from_flat(context.run_config)
    if not config.federation.run_dir:
        raise FedrecError("federation.run_dir is not set", hint="Start runs with `fedrec server --run-dir DIR`.")
    run_dir = Path(config.federation.run_dir)
    run = RunFolder.open(run_dir, config.to_flat(), resume=config.federation.resume)
    torch.manual_seed(config.train.seed)          # the same initial adapters on every restart
    teacher = Teacher(config.model)
    counts = teacher.parameter_counts()
    log(f"run {run_dir.name}: {config.federation.rounds} rounds, strategy {config.federation.strategy}; "
        f"adapters {counts['adapters']:,} of {counts['total']:,} teacher parameters travel")
    adapters = Coordinator(grid, config, run_dir.name).run(run, teacher.adapter_state())
    teacher.load_adapter_state(adapters)
    teacher.save(run_dir / "final", {"federated_run": str(run_dir), "rounds": run.last_round(),
                                     "privacy": run.claims})
    log(f"final teacher saved in {run_dir / 'final'}")
