"""Faults, proven on real processes: regions killed or hung at each stage of a round, and a full
or read-only disk under the server's checkpoints and a region's ledger."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from deployments import Deployment, rounds_done, tiny_config, wait_for_run, wait_until

from fedrec.federation.launch import run_config
from fedrec.federation.region import sent_update_path
from fedrec.federation.run_folder import RunFolder, read_run_id
from fedrec.privacy.accountant import opacus_epsilon
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.ledger import Ledger
from fedrec.privacy.signing import SigningKey
from fedrec.privacy.spend import segments

# one region per stage, each serving the real "row" silo with its own state and DP budget
VICTIMS = {"v-hang": "before-training", "v-mid": "mid-training", "v-ledger": "after-ledger",
           "v-send": "while-sending"}
TIMEOUT = 150.0    # generous: on 2 loaded cores every reply starts a fresh ClientApp process, five at once


@pytest.mark.xdist_group("faults")     # minutes of real processes: one worker, beside the "flower" group
def test_regions_killed_or_hung_at_each_stage_never_undercount(tiny_encoder, prepared, tmp_path):
    run_dir = tmp_path / "run"
    deployment = Deployment(tmp_path, prepared)
    budget = RegionBudget(epsilon=60.0, delta=1e-3)
    markers = {name: tmp_path / f"{name}.frozen" for name in VICTIMS}
    try:
        deployment.start_superlink()
        nodes = [deployment.start_region("eu", wait=False)]
        for name, stage in VICTIMS.items():
            nodes.append(deployment.start_region(name, wait=False, data="row", budget=budget, env={
                "FEDREC_FREEZE_AT": stage, "FEDREC_FREEZE_FILE": str(markers[name])}))
        for node in nodes:
            node.wait_for("SuperNode ID:", 120)
        control = deployment.control()
        config = tiny_config(tiny_encoder, prepared, rounds=3, min_regions=1, round_timeout=TIMEOUT, evaluate_every=0)
        run_id = control.submit(run_config(config, run_dir, resume=False))

        restarted = []

        def restart_the_frozen() -> bool:
            """Killed at their stage, restarted by their operators, each as soon as it freezes."""
            for name in ("v-mid", "v-ledger", "v-send"):
                if name not in restarted and markers[name].exists():
                    deployment.nodes[name].kill()
                    deployment.start_region(name, wait=False, data="row", budget=budget)
                    restarted.append(name)
            return len(restarted) == 3 and markers["v-hang"].exists()

        wait_until(restart_the_frozen, 300, "every region to reach its stage")
        assert {n: json.loads(m.read_text())["where"] for n, m in markers.items()} == \
            {n: f"{n} round 1" for n in VICTIMS}
        for name in restarted:
            deployment.nodes[name].wait_for("SuperNode ID:", 120)
        back_before_round_2 = not rounds_done(run_dir)      # a slow machine may start round 2 first
        wait_until(lambda: rounds_done(run_dir) == [1], 2 * TIMEOUT + 60, "round 1 to time out on v-hang")
        assert deployment.nodes["v-hang"].alive(), "the hung region was never killed"
        markers["v-hang"].unlink()                           # it wakes up, answers round 1 late
        status = wait_for_run(control, run_id, run_dir, 400)
        logs = control.logs(run_id)
        assert status[0] == "completed", logs
        assert all(f"region {name} dropped" in logs for name in VICTIMS)
    finally:
        deployment.stop()

    history = json.loads((run_dir / "metrics.json").read_text())
    regions = tmp_path / "regions"                          # each region's own state folder
    assert [r["round"] for r in history] == [1, 2, 3]
    assert sorted(history[0]["regions"]) == ["eu"] and sorted(history[0]["dropped"]) == sorted(VICTIMS)
    assert history[0]["dropped"]["v-hang"] == f"no reply within {TIMEOUT:.0f}s"
    # regions restarted before round 2 began are in it (their dead nodes superseded, not waited
    # on); the thawed one answers its late round 1 first, so it may miss round 2 too
    assert "eu" in history[1]["regions"], history[1]
    if back_before_round_2:
        assert {"v-mid", "v-ledger", "v-send"} <= set(history[1]["regions"]), history[1]
        assert set(history[1]["dropped"]) <= {"v-hang"}, history[1]
    assert sorted(history[2]["regions"]) == sorted(["eu", *VICTIMS]), f"every region rejoined: {history[2]}"

    # round 1's global is eu's update alone: no late or orphaned update was applied
    global_1, _ = RunFolder(run_dir).load_round(1)
    with np.load(sent_update_path(regions / "eu", read_run_id(run_dir), 1)) as eu_sent:
        for name, value in global_1.items():
            np.testing.assert_allclose(value, eu_sent[name], rtol=1e-6)

    # a ledger never shows less than was released: every applied update has its entry, and the
    # spends that never reached the server (ledger written, then killed or late) are counted too
    released_in_round_1 = {"v-hang": True, "v-mid": False, "v-ledger": True, "v-send": True}
    for name, spent in released_in_round_1.items():
        entries = Ledger(regions / name / "ledger.jsonl").entries()
        applied = [r["round"] for r in history if name in r["regions"]]
        assert 1 not in applied and set(applied) <= {e.round for e in entries}, name
        assert (entries[0].round == 1) == spent, f"{name}: round 1 spend recorded iff its ledger was reached"
        assert entries[-1].epsilon == pytest.approx(opacus_epsilon(segments(entries), budget.delta), rel=1e-9)
    # and what the server was told (its privacy claims) never exceeds what the ledgers say
    claims = json.loads((run_dir / "privacy.json").read_text())["claims"]
    for name in VICTIMS:
        entries = Ledger(regions / name / "ledger.jsonl").entries()
        assert claims[name]["epsilon"] <= entries[-1].epsilon + 1e-12
    assert sent_update_path(regions / "v-send", read_run_id(run_dir), 1).exists()
    assert not sent_update_path(regions / "v-ledger", read_run_id(run_dir), 1).exists()
    assert not sent_update_path(regions / "v-mid", read_run_id(run_dir), 1).exists()
    audit = subprocess.run([sys.executable, "-m", "fedrec.tools", "audit", str(run_dir), str(regions)], capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr


# A child process writes under a real OS limit: RLIMIT_FSIZE makes writes fail part-way (the
# disk-full case, EFBIG), or it runs as an unprivileged user in a folder it may not write.
CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np
    from fedrec.errors import FedrecError
    from fedrec.federation.run_folder import RunFolder
    from fedrec.privacy.ledger import Ledger
    from fedrec.privacy.signing import SigningKey
    mode, folder = sys.argv[1], sys.argv[2]
    if mode == "full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = os.path.getsize(os.path.join(folder, "regions", "ledger.jsonl")) + 100
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    elif os.geteuid() == 0:          # root ignores permissions: become nobody
        os.setgid(65534); os.setuid(65534)
    failures = []
    try:
        RunFolder.open(folder, {"x": 1}, resume=True).complete_round(
            2, {"a": np.ones(100_000, np.float32)}, {}, {"round": 2}, {})  # opening rewrites config.json
    except FedrecError as exc:
        failures.append(str(exc))
    try:
        key = SigningKey.load_or_create(os.path.join(folder, "regions"))
        Ledger(os.path.join(folder, "regions", "ledger.jsonl")).append(key, **ENTRY)
    except FedrecError as exc:
        failures.append(str(exc))
    print("\\n".join(failures))
    sys.exit(len(failures))
""")


def ledger_fields(round_: int) -> dict:
    return {"region": "eu", "run": "run", "round": round_, "steps": 10, "sample_rate": 0.1,
            "noise_multiplier": 1.0, "max_grad_norm": 1.0, "users": 100, "delta": 1e-3, "epsilon": 1.0,
            "budget_epsilon": 8.0, "accountant": "prv", "time": "2026-11-28T00:00:00Z"}


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_full_or_read_only_disk_is_a_clear_error_and_loses_nothing(mode, tmp_path):
    folder = Path(tempfile.mkdtemp(prefix=f"fedrec-{mode}-"))     # outside pytest's private tmp: nobody may read it
    run = RunFolder.open(folder, {"x": 1}, resume=False)
    run.complete_round(1, {"a": np.zeros(10, np.float32)}, {}, {"round": 1}, {})
    ledger = Ledger(folder / "regions" / "ledger.jsonl")
    ledger.append(SigningKey.load_or_create(folder / "regions"), **ledger_fields(1))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    read_only = mode == "read-only" and os.geteuid() != 0
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o555 if read_only else 0o755) if path.is_dir() else 0o644)
    script = CHILD.replace("**ENTRY", "**" + repr(ledger_fields(2)))
    child = subprocess.run([sys.executable, "-c", script, mode, str(folder)], capture_output=True, text=True,
                           timeout=120)
    try:
        assert child.returncode == 2, child.stdout + child.stderr     # both writes refused, no traceback
        assert "Traceback" not in child.stderr
        reasons = child.stdout.strip().splitlines()
        assert ("File too large" if mode == "full" else "Permission denied") in reasons[0]
        assert all("cannot write" in r and str(folder) in r for r in reasons)
        after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert after == before, "nothing already written changed, no temporary file left behind"
        assert RunFolder.open(folder, {"x": 1}, resume=True).last_round() == 1
        assert [e.round for e in ledger.entries()] == [1]
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
