"""Real Flower deployments on loopback: SuperLink and SuperNodes as separate processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deployments import REGIONS, Deployment, rounds_done, tiny_config, wait_for_run, wait_until

from fedrec.data.silo import load_silo
from fedrec.federation.certs import create_dev_pki, create_node_key
from fedrec.federation.deployment import start_supernode
from fedrec.federation.launch import run_config, simulate
from fedrec.federation.region import RegionSettings, sent_update_path
from fedrec.federation.run_folder import RunFolder, read_run_id
from fedrec.privacy.accountant import opacus_epsilon
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.plan import round_shape
from fedrec.privacy.ledger import Ledger
from fedrec.training.objective import can_train

# minutes of real processes each: one pytest-xdist worker runs them one after another (`make test`)
pytestmark = pytest.mark.xdist_group("flower")


def test_two_rounds_three_regions_with_dp_decline_average_and_audit(tiny_encoder, prepared, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_encoder, prepared, rounds=2, min_regions=2)
    row_users = sum(can_train(u) for u in load_silo(prepared / "row").users)
    q, steps = round_shape(row_users, config.train.batch_size, 1)
    one_round = opacus_epsilon([(2.0, q, steps)], 1e-3)
    budgets = {"eu": RegionBudget(epsilon=40.0, delta=1e-3),                              # DP, ample
               "row": RegionBudget(epsilon=one_round * 1.05, delta=1e-3, noise_multiplier=2.0),  # one round
               "uk": RegionBudget(enabled=False)}                                          # --no-dp
    history = simulate(prepared, REGIONS, run_dir, config, budgets, tls=True, state_root=run_dir / "regions")

    assert [r["round"] for r in history] == [1, 2]
    assert sorted(history[0]["regions"]) == REGIONS and not history[0]["declined"]
    assert sorted(history[1]["regions"]) == ["eu", "uk"] and "over its budget" in history[1]["declined"]["row"]
    for record in history:
        assert not record["dropped"]
        assert all(m["bytes_sent"] > 0 and "val_ndcg@10" in m for m in record["regions"].values())
    # the global adapters are the example-weighted mean of what the regions say they sent
    run = RunFolder(run_dir)
    for server_round, regions in ((1, REGIONS), (2, ["eu", "uk"])):
        global_state, _ = run.load_round(server_round)
        sent = {r: np.load(sent_update_path(run_dir / "regions" / r, read_run_id(run_dir), server_round)) for r in regions}
        weights = {r: int(sent[r]["__num_examples__"]) for r in regions}
        assert weights == {r: history[server_round - 1]["regions"][r]["num_examples"] for r in regions}
        total = sum(weights.values())
        for name, value in global_state.items():
            expected = sum(weights[r] * sent[r][name].astype(np.float64) for r in regions) / total
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
    assert not sent_update_path(run_dir / "regions" / "row", read_run_id(run_dir), 2).exists(), "nothing left row in round 2"
    assert (run_dir / "final" / "tower.safetensors").is_file()
    final_meta = json.loads((run_dir / "final" / "teacher.json").read_text())
    assert sorted(final_meta["privacy"]) == ["eu", "row"]

    # DP regions wrote one ledger entry per update they released; the --no-dp region none
    ledgers = {r: Ledger(run_dir / "regions" / r / "ledger.jsonl").entries() for r in ("eu", "row")}
    assert [e.round for e in ledgers["eu"]] == [1, 2] and ledgers["eu"][1].epsilon > ledgers["eu"][0].epsilon
    assert [e.round for e in ledgers["row"]] == [1] and ledgers["row"][0].epsilon <= budgets["row"].epsilon
    assert not (run_dir / "regions" / "uk" / "ledger.jsonl").exists()
    audit = subprocess.run([sys.executable, "-m", "fedrec.tools", "audit", str(run_dir),
                            "--json", str(tmp_path / "audit.json"), "--html", str(tmp_path / "audit.html")],
                           capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["ok"] and len(report["claims"]) == 4 and all(c["ok"] for c in report["claims"])
    assert "data:image/png;base64" in (tmp_path / "audit.html").read_text()

    # dropping the last entry of a ledger breaks the run's claims
    ledger = run_dir / "regions" / "eu" / "ledger.jsonl"
    ledger.write_text(ledger.read_text().splitlines()[0] + "\n")
    audit = subprocess.run([sys.executable, "-m", "fedrec.tools", "audit", str(run_dir)],
                           capture_output=True, text=True)
    assert audit.returncode == 1 and "not in its ledger" in audit.stdout


@pytest.fixture
def deployment(tmp_path, prepared):
    deployment = Deployment(tmp_path, prepared)
    yield deployment
    deployment.stop()


def start_run(deployment, tiny_encoder, run_dir, min_regions):
    """SuperLink, the three regions, and a two-round run submitted to them."""
    deployment.start_superlink()
    for region in REGIONS:
        deployment.start_region(region)
    config = tiny_config(tiny_encoder, deployment.prepared, rounds=2, min_regions=min_regions, evaluate_every=10)
    control = deployment.control()
    return config, control, control.submit(run_config(config, run_dir, resume=False))


def test_server_killed_mid_round_resumes_without_repeating_or_double_applying(tiny_encoder, deployment, tmp_path):
    run_dir = tmp_path / "run"
    config, control, _ = start_run(deployment, tiny_encoder, run_dir, min_regions=3)
    wait_until(lambda: rounds_done(run_dir) == [1] and all(
        node.text().count("Receiving: train message") >= 2 for node in deployment.nodes.values()),
        300, "round 2 to reach every region")
    deployment.superlink.stop(sig=signal.SIGKILL)      # the coordinator dies with round 2 in flight
    control.close()
    first = RunFolder(run_dir).load_round(1)[0]
    with pytest.raises(Exception, match="already holds a run"):
        RunFolder.open(run_dir, {}, resume=False)
    deployment.start_superlink()                        # same port and database; regions reconnect
    control = deployment.control()
    run_id = control.submit(run_config(config, run_dir, resume=True))
    assert wait_for_run(control, run_id, run_dir, 400)[0] == "completed", control.logs(run_id)
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2], "no round repeated or skipped"
    assert "resuming after round 1" in control.logs(run_id)
    run = RunFolder(run_dir)
    for name, value in first.items():
        np.testing.assert_array_equal(run.load_round(1)[0][name], value)
    # round 2, redone, holds each region's update exactly once: the mean of what they sent
    global_2, _ = run.load_round(2)
    sent = {r: np.load(sent_update_path(run_dir.parent / "regions" / r, read_run_id(run_dir), 2)) for r in REGIONS}
    weights = {r: int(sent[r]["__num_examples__"]) for r in REGIONS}
    for name, value in global_2.items():
        expected = sum(weights[r] * sent[r][name].astype(np.float64) for r in REGIONS) / sum(weights.values())
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)


def fedrec(log: Path, *args) -> subprocess.Popen:
    """A `fedrec` command in its own process group, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedrec.tools", *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def test_fedrec_server_and_client_run_a_round_and_unregistered_wrong_certificate_plain_text_are_refused(
        tiny_encoder, prepared, tmp_path):
    """The production path: `fedrec server` registers the region's key and runs a round that
    `fedrec client` serves over TLS with node authentication; other nodes never get in."""
    deployment = Deployment(tmp_path, prepared, tls=True)
    server = client = None
    try:
        deployment.start_superlink(auth=True)
        good, good_pub = create_node_key(tmp_path / "keys", "eu")
        rogue, _ = create_node_key(tmp_path / "keys", "rogue")
        settings = tiny_config(tiny_encoder, prepared).to_flat()
        overrides = [arg for key in ("model.encoder", "train.batch_size", "federation.eval_splits",
                                     "federation.wait_for_regions", "federation.round_timeout")
                     for arg in ("--set", f"{key}={settings[key]}")]
        server_log, client_log = tmp_path / "server.log", tmp_path / "client.log"
        server = fedrec(server_log, "server", "--run-dir", tmp_path / "run", "--catalog", prepared / "catalog.parquet",
                        "--superlink", deployment.address, "--certs", tmp_path / "certs", "--register", good_pub,
                        "--rounds", 1, "--min-regions", 1, *overrides)
        registered = wait_until(lambda: re.search(r"as node (\d+)", server_log.read_text()), 120, "the key registered")
        node_id = int(registered[1])
        client = fedrec(client_log, "client", "--region", "eu", "--data", prepared / "eu", "--superlink",
                        deployment.address, "--root-cert", tmp_path / "certs" / "ca.crt", "--auth-key", good,
                        "--state-dir", tmp_path / "regions" / "eu", "--no-dp")
        wait_until(lambda: "connected; waiting for rounds" in client_log.read_text(), 120, "the region to connect")
        unregistered = deployment.start_region("uk", wait=False, auth_key=rogue)
        other_ca = create_dev_pki(tmp_path / "other-ca").ca        # a CA the SuperLink's cert is not from
        wrong_cert = deployment.start_region("row", wait=False, auth_key=good, root_cert=other_ca)
        plain = RegionSettings("plain", str(prepared / "row"), str(tmp_path / "regions" / "plain"),
                               RegionBudget(enabled=False))
        plain_text = start_supernode("supernode-plain", deployment.address, plain.node_config(), Path(plain.state_dir),
                                     None, wait=False)       # --insecure: plain text to a TLS port
        deployment.nodes["plain"] = plain_text
        wait_until(lambda: unregistered.popen.poll() is not None, 120, "the unregistered node to be refused")
        assert unregistered.popen.returncode != 0 and "Failed to activate SuperNode" in unregistered.text()
        wait_until(lambda: wrong_cert.popen.poll() is not None, 120, "the wrong-certificate node to give up")
        assert wrong_cert.popen.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong_cert.text()
        wait_until(lambda: plain_text.text().count("Connection attempt failed") >= 3, 120,
                   "the plain-text node to be refused three times")
        for refused in (wrong_cert, plain_text):
            assert "SuperNode ID:" not in refused.text(), refused.text()
        online = [n for n, status in deployment.control().nodes().items() if status == "online"]
        assert online == [node_id], "only the registered, verified node is connected"
        assert server.wait(300) == 0, server_log.read_text()
        assert "done: 1 round(s)" in server_log.read_text()
        assert [r["round"] for r in json.loads((tmp_path / "run" / "metrics.json").read_text())] == [1]
        assert (tmp_path / "run" / "final" / "tower.safetensors").is_file()
        client.send_signal(signal.SIGTERM)                  # the region leaves, stopping its SuperNode
        assert client.wait(60) == 0 and "leaving the federation" in client_log.read_text()
    finally:
        for process in (server, client):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        deployment.stop()
