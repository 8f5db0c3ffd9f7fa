"""Helpers for tests that run a real Flower deployment: SuperLink and SuperNodes on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedrec.config import FedrecConfig
from fedrec.federation.certs import create_dev_pki
from fedrec.federation.deployment import Control, free_port, start_superlink, start_supernode
from fedrec.federation.launch import RunWatch
from fedrec.federation.region import RegionSettings
from fedrec.privacy.budget import RegionBudget

REGIONS = ["eu", "row", "uk"]


def tiny_config(tiny_encoder, prepared: Path, **federation) -> FedrecConfig:
    values = {"model.encoder": str(tiny_encoder), "train.batch_size": 8, "federation.eval_splits": "val",
              "federation.wait_for_regions": 120.0, "federation.round_timeout": 300.0,
              "federation.catalog": str(prepared / "catalog.parquet")}
    values.update({f"federation.{k}": v for k, v in federation.items()})
    return FedrecConfig.from_flat(values)


def wait_until(condition, timeout: float, what: str, every: float = 0.5):
    """Poll `condition` every `every` s; a condition that asks the SuperLink (a `flwr` command,
    about a second of CPU) should poll every few seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_run(control: Control, run_id: int, run_dir: Path, timeout: float) -> tuple[str, str]:
    """(sub_status, details) once the run has finished, asking the SuperLink as `fedrec` does."""
    return wait_until(RunWatch(control, run_id, run_dir).finished, timeout, f"run {run_id} to finish", every=1)


def rounds_done(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.json"
    return [r["round"] for r in json.loads(path.read_text())] if path.exists() else []


class Deployment:
    """A SuperLink and region SuperNodes started by hand, as separate operators would."""

    def __init__(self, root: Path, prepared: Path, tls: bool = False):
        self.root, self.prepared = root, prepared
        self.pki = create_dev_pki(root / "certs") if tls else None
        self.address = f"127.0.0.1:{free_port()}"
        self.superlink = None
        self.nodes = {}

    def start_superlink(self, auth: bool = False):
        self.superlink = start_superlink(self.address, self.root / "superlink", self.pki, auth)
        return self.superlink

    def start_region(self, region: str, wait: bool = True, auth_key: Path | None = None, data: str | None = None,
                     budget: RegionBudget | None = None, env: dict[str, str] | None = None,
                     root_cert: Path | None = None):
        """`data` names the prepared silo to serve (default: the region's own)."""
        node = RegionSettings(region, str(self.prepared / (data or region)), str(self.root / "regions" / region),
                              budget or RegionBudget(enabled=False))
        self.nodes[region] = start_supernode(f"supernode-{region}", self.address, node.node_config(),
                                             Path(node.state_dir), root_cert or (self.pki.ca if self.pki else None),
                                             auth_key, wait=wait, env=env)
        return self.nodes[region]

    def control(self) -> Control:
        return Control(self.address, self.pki.ca if self.pki else None)

    def stop(self):
        for process in [*self.nodes.values(), self.superlink]:
            if process is not None:
                process.stop()
