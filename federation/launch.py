"""Start a federation: the server side (`fedrec server`), one region (`fedrec client`), or the
whole thing on one machine (`fedrec simulate`: a SuperLink and one SuperNode per region as
separate processes on loopback)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from fedrec.config import FedrecConfig
from fedrec.errors import FedrecError
from fedrec.federation.certs import create_dev_pki
from fedrec.federation.deployment import Control, Process, free_port, start_superlink, start_supernode
from fedrec.federation.region import default_state_dir
from fedrec.privacy.budget import RegionBudget


@dataclass
class RegionNode:
    """What a region's operator decides: where its data is, where its records go, its budget."""

    region: str
    data: Path
    state_dir: Path
    budget: RegionBudget

    def node_config(self) -> dict:
        b = self.budget
        return {"region": self.region, "data": str(self.data.resolve()), "state_dir": str(self.state_dir.resolve()),
                "dp": b.enabled, "epsilon": b.epsilon, "delta": b.delta, "max_grad_norm": b.max_grad_norm,
                "noise_multiplier": b.noise_multiplier, "accountant": b.accountant}


def run_config(config: FedrecConfig, run_dir: Path, resume: bool) -> dict:
    flat = config.to_flat()
    if not config.federation.catalog:
        raise FedrecError("the server needs the public catalog", hint="Pass --catalog CATALOG.parquet.")
    flat["federation.catalog"] = str(Path(config.federation.catalog).resolve())
    flat["federation.run_dir"] = str(run_dir.resolve())
    flat["federation.resume"] = resume
    return flat


def follow(control: Control, run_id: int, run_dir: Path, rounds: int,
           echo: Callable[[str], None] = print, poll: float = 2.0) -> list[dict]:
    """Progress bar over rounds with per-region metrics, until the Flower run finishes."""
    metrics = run_dir / "metrics.json"
    shown = 0
    with tqdm(total=rounds, desc="rounds", unit="round") as bar:
        while True:
            history = json.loads(metrics.read_text()) if metrics.exists() else []
            for record in history[shown:]:
                regions = record["regions"]
                bar.set_postfix_str(" ".join(
                    f"{r}:{m['val_ndcg@10']:.3f}" for r, m in sorted(regions.items()) if "val_ndcg@10" in m))
                for region, reason in record.get("dropped", {}).items():
                    echo(f"round {record['round']}: region {region} dropped ({reason})")
                for region, reason in record.get("declined", {}).items():
                    echo(f"round {record['round']}: {reason}")
                bar.update(1)
            shown = len(history)
            status, sub_status, details = control.status(run_id)
            if status == "finished":
                if sub_status != "completed":
                    raise FedrecError(f"the federation run {run_id} {sub_status}: {details}\n"
                                      f"{_tail(control.logs(run_id))}")
                return history
            time.sleep(poll)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def submit_and_follow(control: Control, config: FedrecConfig, run_dir: Path, resume: bool,
                      echo: Callable[[str], None] = print) -> list[dict]:
    run_id = control.submit(run_config(config, run_dir, resume))
    echo(f"run {run_id} submitted; run folder {run_dir}")
    try:
        return follow(control, run_id, run_dir, config.federation.rounds, echo)
    except KeyboardInterrupt:
        echo(f"stopping run {run_id}")
        control.stop(run_id)
        raise


def simulate(data_root: Path, regions: list[str], run_dir: Path, config: FedrecConfig,
             budgets: dict[str, RegionBudget], tls: bool = True, resume: bool = False,
             echo: Callable[[str], None] = print, state_root: Path | None = None) -> list[dict]:
    """The whole federation on one machine: separate processes talking over loopback. Each
    region keeps its records where `fedrec client` would (beside its data), or under
    `state_root`/<region>."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, federation=dataclasses.replace(
        config.federation, catalog=str(Path(data_root) / "catalog.parquet")))
    pki = create_dev_pki(run_dir / "certs") if tls else None
    address = f"127.0.0.1:{free_port()}"
    processes: list[Process] = []
    control = Control(address, pki.ca if pki else None)
    try:
        processes.append(start_superlink(address, run_dir / "superlink", pki))
        for region in regions:
            state_dir = state_root / region if state_root else default_state_dir(data_root / region)
            node = RegionNode(region, data_root / region, state_dir, budgets[region])
            processes.append(start_supernode(f"supernode-{region}", address, node.node_config(),
                                             node.state_dir, pki.ca if pki else None, wait=False))
        for process in processes[1:]:
            process.wait_for("SuperNode ID:", 120)
        echo(f"SuperLink on {address} ({'TLS' if pki else 'insecure'}); regions {', '.join(regions)}")
        return submit_and_follow(control, config, run_dir, resume, echo)
    finally:
        control.close()
        for process in reversed(processes):
            process.stop()
