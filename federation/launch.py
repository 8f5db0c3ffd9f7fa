"""Start a federation: the coordinator (`serve`, behind `fedrec server`), one region (`join`,
behind `fedrec client`), or the whole thing on one machine (`simulate`, behind `fedrec simulate`:
`serve` with every region joined alongside, each a separate process on loopback)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from fedrec.config import FedrecConfig
from fedrec.errors import FedrecError
from fedrec.federation.certs import ServerTLS, create_dev_pki
from fedrec.federation.deployment import Control, Process, free_port, start_superlink, start_supernode
from fedrec.federation.region import RegionSettings, default_state_dir
from fedrec.model.teacher import TEACHER_FILE
from fedrec.privacy.budget import RegionBudget
from fedrec.training.objective import can_train

log = logging.getLogger(__name__)


def run_config(config: FedrecConfig, run_dir: Path, resume: bool) -> dict:
    flat = config.to_flat()
    if not config.federation.catalog:
        raise FedrecError("the server needs the public catalog", hint="Pass --catalog CATALOG.parquet.")
    flat["federation.catalog"] = str(Path(config.federation.catalog).resolve())
    flat["federation.run_dir"] = str(run_dir.resolve())
    flat["federation.resume"] = resume
    return flat


@dataclasses.dataclass
class RunWatch:
    """Whether a Flower run has finished, asked cheaply: each answer is a `flwr list` process
    (about 2 s of CPU, which on 2 cores slows the regions), so the SuperLink is asked only once the
    run folder holds the final teacher, or every `ask_every` s so that a failed run is seen too."""

    control: Control
    run_id: int
    run_dir: Path
    ask_every: float = 30.0
    asked: float = -math.inf

    def finished(self) -> tuple[str, str] | None:
        """(sub_status, details) once the run has finished, else None."""
        if (self.run_dir / "final" / TEACHER_FILE).exists() or time.monotonic() - self.asked >= self.ask_every:
            (status, sub_status, details), self.asked = self.control.status(self.run_id), time.monotonic()
            if status == "finished":
                return sub_status, details
        return None


def follow(control: Control, run_id: int, run_dir: Path, rounds: int, poll: float = 5.0) -> list[dict]:
    """Progress bar over rounds with per-region metrics, until the Flower run finishes (the run
    folder read every `poll` s)."""
    metrics, watch = run_dir / "metrics.json", RunWatch(control, run_id, run_dir)
    shown = 0
    with tqdm(total=rounds, desc="rounds", unit="round") as bar:
        while True:
            finished = watch.finished()          # before reading: once finished, all rounds are in
            history = json.loads(metrics.read_text()) if metrics.exists() else []
            for record in history[shown:]:
                regions = record["regions"]
                bar.set_postfix_str(" ".join(
                    f"{r}:{m['val_ndcg@10']:.3f}" for r, m in sorted(regions.items()) if "val_ndcg@10" in m))
                for region, reason in record.get("dropped", {}).items():
                    log.warning(f"round {record['round']}: region {region} dropped ({reason})")
                for region, reason in record.get("declined", {}).items():
                    log.warning(f"round {record['round']}: {reason}")
                bar.update(1)
            shown = len(history)
            if finished:
                sub_status, details = finished
                if sub_status != "completed":
                    raise FedrecError(f"the federation run {run_id} {sub_status}: {details}\n"
                                      f"{_tail(control.logs(run_id))}")
                return history
            time.sleep(poll)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def submit_and_follow(control: Control, config: FedrecConfig, run_dir: Path, resume: bool) -> list[dict]:
    run_id = control.submit(run_config(config, run_dir, resume))
    log.info(f"run {run_id} submitted; run folder {run_dir}")
    try:
        return follow(control, run_id, run_dir, config.federation.rounds)
    except KeyboardInterrupt:
        log.info(f"stopping run {run_id}")
        control.stop(run_id)
        raise


def serve(config: FedrecConfig, run_dir: Path, *, listen: str = "127.0.0.1:8000", superlink: str | None = None,
          tls: ServerTLS | None = None, auth: bool = False, register: Sequence[Path] = (), resume: bool = False,
          alongside: Callable[[str], AbstractContextManager] = lambda address: nullcontext()) -> list[dict]:
    """Coordinate one run: start a SuperLink on `listen` (or attach to the one at `superlink`),
    register node keys, submit the run and follow it to the end; returns its round history.
    `alongside(address)` is entered once the SuperLink is up and left before it stops (simulate
    joins its regions there)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    address = superlink or listen
    process = None
    control = Control(address, tls.ca if tls else None)
    try:
        if superlink is None:
            process = start_superlink(listen, run_dir / "superlink", tls, auth)
            log.info(f"SuperLink listening on {listen} ({'TLS' if tls else 'insecure'}"
                     f"{', node authentication' if auth else ''}); log {process.log}")
        for key in register:
            log.info(f"registered {key} as node {control.register_node(key)}")
        with alongside(address):
            return submit_and_follow(control, config, run_dir, resume)
    finally:
        control.close()
        if process is not None:
            process.stop()


def join(node: RegionSettings, superlink: str, root_cert: Path | None = None, auth_key: Path | None = None,
         connected_within: float | None = 120.0) -> Process:
    """One region joins the federation as a SuperNode. Its budget is checked against its own data
    first (δ below 1/users), so nothing starts for a budget that could not hold. Returns the
    running SuperNode, once connected (or at once, with `connected_within=None`)."""
    users = sum(can_train(u) for u in node.silo().users)
    node.budget.validate(users)
    process = start_supernode(f"supernode-{node.region}", superlink, node.node_config(), Path(node.state_dir),
                              root_cert, auth_key, wait=False)
    budget = node.budget
    log.info(f"region {node.region}: {users} users, "
             f"{f'DP ε={budget.epsilon:g} δ={budget.delta:g}' if budget.enabled else 'NO DP'}; "
             f"SuperNode log {process.log}")
    if connected_within is not None:
        try:
            process.wait_for("SuperNode ID:", connected_within)
        except BaseException:
            process.stop()
            raise
    return process


def simulate(data_root: Path, regions: list[str], run_dir: Path, config: FedrecConfig,
             budgets: dict[str, RegionBudget], tls: bool = True, resume: bool = False,
             state_root: Path | None = None) -> list[dict]:
    """The whole federation on one machine: `serve` on a free loopback port with every region
    joined alongside, each a separate process. Each region keeps its records where `fedrec
    client` would (beside its data), or under `state_root`/<region>."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, federation=dataclasses.replace(
        config.federation, catalog=str(Path(data_root) / "catalog.parquet")))
    pki = create_dev_pki(run_dir / "certs") if tls else None

    @contextmanager
    def regions_joined(address: str) -> Iterator[None]:
        joined: list[Process] = []
        try:
            for region in regions:
                state_dir = state_root / region if state_root else default_state_dir(data_root / region)
                node = RegionSettings(region, str(data_root / region), str(state_dir), budgets[region])
                joined.append(join(node, address, pki.ca if pki else None, connected_within=None))
            for process in joined:
                process.wait_for("SuperNode ID:", 120)
            log.info(f"SuperLink on {address} ({'TLS' if pki else 'insecure'}); regions {', '.join(regions)}")
            yield
        finally:
            for process in reversed(joined):
                process.stop()

    return serve(config, run_dir, listen=f"127.0.0.1:{free_port()}", tls=pki, resume=resume,
                 alongside=regions_joined)
