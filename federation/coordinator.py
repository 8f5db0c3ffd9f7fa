"""The server's loop over rounds, on Flower's Grid (Message API).

Each round: wait for enough regions, send them the global adapters, collect updates (a region
may decline when its privacy budget is spent, or drop out), aggregate, let the regions evaluate
the new global adapters on their own users, and checkpoint. Only adapters and small records
travel.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.config import FedrecConfig
from fedrec.errors import FedrecError
from fedrec.federation.run_folder import RunFolder
from fedrec.federation.strategy import Aggregator, RegionUpdate
from fedrec.privacy.claims import ClaimError, PrivacyClaim

log = logging.getLogger(__name__)

State = dict[str, np.ndarray]


def to_record(adapters: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in adapters.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: v.numpy() for k, v in record.items()}


def state_bytes(adapters: State) -> int:
    return int(sum(v.nbytes for v in adapters.values()))


def region_claim(info: dict, earlier: PrivacyClaim | None) -> tuple[PrivacyClaim | None, str]:
    """The claim for the ledger entry a DP update comes with, or why the update cannot be
    accepted ("" when it can): a region's key is the one it signed with earlier in the run."""
    if not info.get("dp"):
        return None, ""
    try:
        claim = PrivacyClaim.parse(info, "its privacy claim")
    except ClaimError as exc:
        return None, str(exc)
    if earlier is not None and earlier.public_key != claim.public_key:
        return None, (f"its ledger entry is signed by key {claim.public_key[:16]}…, not the key "
                      f"{earlier.public_key[:16]}… it signed with earlier in this run")
    return claim, ""


def invalid_update(sent: State, expected: State) -> str:
    """Why a region's update cannot be aggregated ("" when it can)."""
    if set(sent) != set(expected):
        return "its tensors do not match the global adapters"
    for name, value in sent.items():
        if value.shape != expected[name].shape:
            return f"{name} has shape {value.shape}, expected {expected[name].shape}"
        if not np.all(np.isfinite(value)):
            return f"{name} holds non-finite values"
    return ""


class Coordinator:
    def __init__(self, grid: Grid, config: FedrecConfig, run_name: str, catalog_fingerprint: str):
        self.grid, self.config, self.run_name = grid, config, run_name
        self.catalog_fingerprint = catalog_fingerprint
        self.region_of: dict[int, str] = {}          # node id → region, learnt from replies
        self.node_of: dict[str, int] = {}            # region → its newest node; older ones are superseded

    def name(self, node: int) -> str:
        return self.region_of.get(node, f"node {node}")

    def wait_for_regions(self) -> list[int]:
        fed = self.config.federation
        deadline = time.monotonic() + fed.wait_for_regions
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= fed.min_regions:
                self.identify([n for n in nodes if n not in self.region_of])
                nodes = [n for n in nodes if self.node_of.get(self.region_of.get(n)) in (n, None)]
                if len(nodes) >= fed.min_regions:
                    return nodes
            if time.monotonic() > deadline:
                raise FedrecError(f"only {len(nodes)} region(s) connected after {fed.wait_for_regions:.0f}s; "
                                  f"need {fed.min_regions}",
                                  hint="Start more `fedrec client` processes or lower --min-regions.")
            time.sleep(1.0)

    def identify(self, nodes: list[int]) -> None:
        """Ask newly connected nodes which region they serve, so logs can name them."""
        if nodes:
            self.exchange(nodes, "query", None, {}, 0)

    def learn_region(self, node: int, region: str) -> None:
        """The node most recently found serving a region speaks for it from now on.

        A region restarted by its operator comes back as a new node while the SuperLink may still
        list the old one for a heartbeat period: no round waits on the dead node.
        """
        if node not in self.region_of:
            self.region_of[node] = region
            if self.node_of.get(region, node) != node:
                log.info(f"region {region} reconnected as node {node}; node {self.node_of[region]} is superseded")
            self.node_of[region] = node

    def exchange(self, nodes: list[int], kind: str, adapters: State | None, config: dict,
                 server_round: int) -> tuple[dict[int, Message], dict[int, str]]:
        """Send one message per node; returns replies by node and failures (node → reason)."""
        content = {"config": ConfigRecord(config)}
        if adapters is not None:
            content["arrays"] = to_record(adapters)
        messages = [Message(RecordDict(content), dst_node_id=node, message_type=kind, group_id=str(server_round))
                    for node in nodes]
        replies = self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout)
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        ok, failed = {}, {}
        for reply in replies:
            node = destination[reply.metadata.reply_to_message_id]
            if reply.has_error():
                failed[node] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                ok[node] = reply
                self.learn_region(node, str(reply.content["info"]["region"]))
        for node in nodes:
            if node not in ok and node not in failed:
                failed[node] = f"no reply within {self.config.federation.round_timeout:.0f}s"
        return ok, failed

    def run(self, run: RunFolder, initial: State) -> State:
        fed = self.config.federation
        last = run.last_round()
        if last:
            adapters, moments = run.load_round(last)
            log.info(f"resuming after round {last}")
        else:
            adapters, moments = initial, {}
        aggregator = Aggregator(fed, moments)
        for server_round in range(last + 1, fed.rounds + 1):
            started = time.perf_counter()
            nodes = self.wait_for_regions()
            replies, failed = self.exchange(nodes, "train", adapters,
                                            {"round": server_round, "run": self.run_name,
                                             "catalog": self.catalog_fingerprint}, server_round)
            record = {"round": server_round, "regions": {}, "dropped": {}, "declined": {}}
            updates, claims = [], {}
            for node, reply in replies.items():
                info = dict(reply.content["info"])
                metrics = dict(reply.content["metrics"])
                region = info["region"]
                if info.get("status") == "declined":
                    record["declined"][region] = info.get("reason", "")
                    log.info(f"round {server_round}: {info.get('reason', region + ' declined')}")
                    continue
                sent = from_record(reply.content["arrays"])
                problem = invalid_update(sent, adapters)
                if region in record["regions"]:
                    problem = "a second update from this region in one round (two nodes serve it)"
                claim, claim_problem = region_claim(info, run.privacy.claims.get(region))
                problem = problem or claim_problem
                if problem:
                    record["dropped"][region] = f"update rejected: {problem}"
                    log.info(f"round {server_round}: region {region}'s update rejected ({problem})")
                    continue
                updates.append(RegionUpdate(region, sent, int(metrics["num_examples"])))
                record["regions"][region] = {**metrics, "bytes_sent": state_bytes(sent)}
                if claim:
                    claims[region] = claim
                    record["regions"][region].update(epsilon=claim.epsilon, noise_multiplier=info["noise_multiplier"])
            for node, reason in failed.items():
                record["dropped"][self.name(node)] = reason
                log.info(f"round {server_round}: region {self.name(node)} dropped ({reason})")
            if not updates:
                if record["declined"] and not failed:
                    log.info("every region declined (privacy budgets spent): ending the run")
                    break
                raise FedrecError(f"round {server_round}: no region returned an update")
            if len(updates) < fed.min_regions:
                raise FedrecError(f"round {server_round}: {len(updates)} update(s), fewer than "
                                  f"--min-regions {fed.min_regions}")
            adapters, norms = aggregator.aggregate(adapters, updates)
            for region, norm in norms.items():
                record["regions"][region]["update_norm"] = norm
            if fed.evaluate_every and (server_round % fed.evaluate_every == 0 or server_round == fed.rounds):
                trained = [n for n, r in replies.items() if r.content["info"].get("status") != "declined"]
                evaluated, eval_failed = self.exchange(trained, "evaluate", adapters,
                                                       {"splits": fed.eval_splits}, server_round)
                for node, reply in evaluated.items():
                    record["regions"].setdefault(self.name(node), {}).update(dict(reply.content["metrics"]))
                for node, reason in eval_failed.items():
                    log.info(f"round {server_round}: region {self.name(node)} did not evaluate ({reason})")
            record["seconds"] = time.perf_counter() - started
            run.complete_round(server_round, adapters, aggregator.moments, record, claims)
            summary = ", ".join(f"{r}: loss {m.get('train_loss', float('nan')):.3f}"
                                + (f" val NDCG@10 {m['val_ndcg@10']:.4f}" if "val_ndcg@10" in m else "")
                                for r, m in sorted(record["regions"].items()))
            log.info(f"round {server_round}/{fed.rounds} done in {record['seconds']:.0f}s — {summary}")
        return adapters
