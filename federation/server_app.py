"""The Flower ServerApp: reads the run config and hands over to the coordinator."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.edge_runtime.messages import print_messages
from fedrec.errors import FedrecError
from fedrec.federation.coordinator import Coordinator
from fedrec.federation.run_folder import RunFolder
from fedrec.model.teacher import initial_tower_state, save_checkpoint
from fedrec.privacy.claims import claims_to_json

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    print_messages("[fedrec server] ")      # on stdout, which Flower forwards as the run's log
    config = FedrecConfig.from_flat(context.run_config)
    if not config.federation.run_dir:
        raise FedrecError("federation.run_dir is not set", hint="Start runs with `fedrec server --run-dir DIR`.")
    run_dir = Path(config.federation.run_dir)
    run = RunFolder.open(run_dir, config.to_flat(), resume=config.federation.resume)
    if not config.federation.catalog:
        raise FedrecError("federation.catalog is not set", hint="Start runs with `fedrec server --catalog CATALOG`.")
    catalog = Catalog.load(config.federation.catalog)
    torch.manual_seed(config.train.seed)          # the same initial tower on every restart
    initial = initial_tower_state(config.model, catalog)
    log.info(f"run {run.run_id}: {config.federation.rounds} rounds, strategy {config.federation.strategy}; "
        f"the tower's {sum(v.size for v in initial.values()):,} parameters travel, for {len(catalog):,} catalog items")
    tower = Coordinator(grid, config, run.run_id, catalog.fingerprint).run(run, initial)
    save_checkpoint(run_dir / "final", config.model, tower, catalog,
                    {"federated_run": str(run_dir), "run_id": run.run_id, "rounds": run.last_round(),
                     "privacy": claims_to_json(run.privacy.claims)})
    log.info(f"final teacher saved in {run_dir / 'final'}")
