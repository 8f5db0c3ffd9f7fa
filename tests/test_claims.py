"""Privacy integrity: one ledger per region's data across runs, signed entries, and claims that
`fedrec audit` checks in full. Runs here go through the region's and the coordinator's own
library calls (plan, sign and record a spend; record the claims of applied updates; save the
final teacher), without training: what is checked is the accounting, and it is real."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrec.atomic import write_json
from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.federation.run_folder import RunFolder
from fedrec.model.teacher import save_checkpoint
from fedrec.privacy.accountant import opacus_epsilon, pld_epsilon
from fedrec.privacy.audit import audit
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.claims import PrivacyClaim
from fedrec.privacy.ledger import GENESIS, LedgerEntry, line_hash
from fedrec.privacy.signing import SigningKey, read_public_key
from fedrec.errors import FedrecError
from fedrec.privacy.spend import RegionPrivacy, segments
from fedrec.privacy.status import region_status

USERS, BATCH = 400, 40


def federated_run(run_dir: Path, states: dict[str, Path], budgets: dict[str, RegionBudget], rounds: int,
                  catalog: Catalog) -> RunFolder:
    """A run as the coordinator records it: each round every region plans, signs and records its
    spend and sends its claim; the coordinator keeps the claims of applied updates."""
    run = RunFolder.open(run_dir, {}, resume=False)
    for server_round in range(1, rounds + 1):
        claims = {}
        for region, state in states.items():
            privacy = RegionPrivacy(region, budgets[region], state)
            decision = privacy.plan_round(USERS, BATCH, 1.0, rounds, run.run_id)
            if decision.allowed:
                claims[region] = PrivacyClaim.of_entry(privacy.record(decision, server_round))
        run.complete_round(server_round, {"w": np.zeros(3, np.float32)}, {}, {"round": server_round}, claims)
    save_checkpoint(run_dir / "final", FedrecConfig().model, {"w": np.zeros(3, np.float32)}, catalog,
                    {"federated_run": str(run_dir), "run_id": run.run_id,
                     "privacy": {r: c.to_json() for r, c in run.privacy.claims.items()}})
    return run


@pytest.fixture(scope="module")
def catalog(prepared) -> Catalog:
    return Catalog.load(prepared / "catalog.parquet")


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory, catalog) -> Path:
    """Two DP regions, three rounds; each test gets its own copy to tamper with."""
    root = tmp_path_factory.mktemp("honest")
    budgets = {r: RegionBudget(epsilon=8.0, delta=1e-5) for r in ("eu", "row")}
    federated_run(root / "run", {r: root / r / ".fedrec" for r in budgets}, budgets, 3, catalog)
    return root


@pytest.fixture
def one_run(honest_run, tmp_path):
    for name in ("run", "eu", "row"):
        shutil.copytree(honest_run / name, tmp_path / name)
    edit_json(tmp_path / "run" / "final" / "teacher.json", lambda d: {**d, "federated_run": str(tmp_path / "run")})
    return RunFolder.open(tmp_path / "run", {}, resume=True), {r: tmp_path / r / ".fedrec" for r in ("eu", "row")}


def test_two_runs_on_one_regions_data_compose_into_one_ledger_and_the_budget_is_for_life(tmp_path, catalog):
    state = {"eu": tmp_path / "eu" / ".fedrec"}
    budget = {"eu": RegionBudget(epsilon=4.0, delta=1e-5)}
    first = federated_run(tmp_path / "first", state, budget, 2, catalog)
    second = federated_run(tmp_path / "second", state, budget, 2, catalog)
    assert first.run_id != second.run_id and first.run_id.startswith("first-")

    entries = RegionPrivacy("eu", budget["eu"], state["eu"]).ledger.entries()
    assert [(e.run, e.round) for e in entries] == [(first.run_id, 1), (first.run_id, 2),
                                                  (second.run_id, 1), (second.run_id, 2)]
    both_runs = opacus_epsilon(segments(entries), 1e-5)
    assert entries[-1].epsilon == pytest.approx(both_runs, rel=1e-9) and both_runs <= 4.0
    # the second run's σ was sized for what the first left, so together they fit the budget
    assert entries[2].noise_multiplier > entries[0].noise_multiplier
    report = audit([tmp_path / "first", tmp_path / "second", state["eu"]])
    assert report.ok, report.problems
    assert report.regions["eu"].epsilon_recorded == pytest.approx(both_runs, rel=1e-9)
    assert [r.run for r in report.regions["eu"].runs] == [first.run_id, second.run_id]

    status = region_status(state["eu"])
    assert status.lifetime_epsilon == pytest.approx(both_runs, rel=1e-9)
    assert [(r.run, r.rounds) for r in status.runs] == [(first.run_id, [1, 2]), (second.run_id, [1, 2])]
    assert status.runs[0].epsilon_alone == status.runs[0].epsilon_after           # the first run starts at 0
    assert status.runs[1].epsilon_alone < status.runs[1].epsilon_after == pytest.approx(both_runs, rel=1e-9)
    printed = subprocess.run([sys.executable, "-m", "fedrec.tools", "privacy", "status", str(state["eu"])],
                             capture_output=True, text=True, check=True).stdout
    assert f"lifetime ε {both_runs:.3f} of budget 4" in printed and status.public_key in printed
    assert f"run {second.run_id}: rounds 1, 2" in printed

    # a third run on the same users finds the lifetime budget (nearly) spent and declines
    privacy = RegionPrivacy("eu", budget["eu"], state["eu"])
    decision = privacy.plan_round(USERS, BATCH, 1.0, 2, "third")
    assert not decision.allowed and "declines" in decision.reason
    assert len(privacy.ledger.entries()) == 4


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(json.dumps(data))


def test_an_honest_run_passes_and_its_claims_are_checked_in_full(one_run, tmp_path):
    run, states = one_run
    report = audit([tmp_path / "run", *states.values()])
    assert report.ok, report.problems
    checked = {(Path(c["source"]).name, c["region"]) for c in report.claims_checked}
    assert checked == {(f, r) for f in ("privacy.json", "teacher.json") for r in ("eu", "row")}
    assert all(c["round"] == 3 for c in report.claims_checked)


def claims_of(data: dict) -> dict:
    return data["claims"] if "claims" in data else data["privacy"]


@pytest.mark.parametrize("probe", ["stale head", "delta and budget", "not a claim file", "region removed",
                                   "newer schema", "key replaced"])
def test_claims_that_under_report_fail_the_audit_with_a_named_reason(one_run, tmp_path, probe):
    run, states = one_run
    teacher_json = tmp_path / "run" / "final" / "teacher.json"
    privacy_json = tmp_path / "run" / "privacy.json"
    eu_entries = RegionPrivacy("eu", RegionBudget(), states["eu"]).ledger.entries()
    older = PrivacyClaim.of_entry(eu_entries[1]).to_json()       # round 2 of 3: a smaller ε
    if probe == "stale head":              # the claim points at an older entry, consistently
        edit_json(teacher_json, lambda d: {**d, "privacy": {**d["privacy"], "eu": older}})
        expected = "claim is stale: it names round 2"
    elif probe == "delta and budget":      # what a forged manifest might claim
        edit_json(teacher_json, lambda d: {**d, "privacy": {**d["privacy"], "eu": {
            **d["privacy"]["eu"], "delta": 1e-12, "budget_epsilon": 1.0}}})
        expected = "differs from its ledger entry 3: delta 1e-12 (ledger: 1e-05); budget_epsilon 1.0 (ledger: 8.0)"
    elif probe == "not a claim file":
        privacy_json.write_text("[1, 2, 3]")
        expected = "privacy.json: must be an object with run_id"
    elif probe == "region removed":
        edit_json(teacher_json, lambda d: {**d, "privacy": {"row": d["privacy"]["row"]}})
        expected = "teacher.json: no claim for region eu"
    elif probe == "newer schema":          # a claim this fedrec cannot read is not taken as read
        assert PrivacyClaim.parse(older, "round trip") == PrivacyClaim.of_entry(eu_entries[1]) and older["schema"] == 1
        edit_json(teacher_json, lambda d: {**d, "privacy": {**d["privacy"], "eu": {**d["privacy"]["eu"], "schema": 2}}})
        expected = "claim schema 2, this fedrec reads 1"
    else:                                  # a claim naming another key than the one that signed
        other = SigningKey.load_or_create(tmp_path / "other").public_hex
        edit_json(privacy_json, lambda d: {**d, "claims": {**d["claims"], "eu": {**d["claims"]["eu"], "public_key": other}}})
        expected = "differs from its ledger entry 3: public_key"
    report = audit([tmp_path / "run", *states.values()])
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems


def forge(state: Path, key: SigningKey | None, sigma_factor: float) -> None:
    """Rewrite a region's ledger with σ × `sigma_factor`, ε recomputed and the chain rebuilt;
    signed with `key` (None keeps the region's old signatures)."""
    path = state / "ledger.jsonl"
    entries = [LedgerEntry(**json.loads(line)) for line in path.read_text().splitlines()]
    prev, lines, history = GENESIS, [], []
    for entry in entries:
        history.append((entry.noise_multiplier * sigma_factor, entry.sample_rate, entry.steps))
        forged = LedgerEntry(**{**entry.__dict__, "noise_multiplier": history[-1][0], "prev_sha256": prev,
                                "epsilon": opacus_epsilon(history, entry.delta, entry.accountant),
                                **({"public_key": key.public_hex} if key else {})})
        if key:
            forged = LedgerEntry(**{**forged.__dict__, "signature": key.sign(forged.signed_bytes())})
        lines.append(forged.line())
        prev = line_hash(forged.line())
    path.write_text("\n".join(lines) + "\n")


def rewrite_claims(run_dir: Path, state: Path, region: str) -> None:
    """Point every claim of `region` at the (forged) ledger's last entry."""
    entries = [LedgerEntry(**json.loads(line)) for line in (state / "ledger.jsonl").read_text().splitlines()]
    claim = PrivacyClaim.of_entry(entries[-1]).to_json()
    edit_json(run_dir / "privacy.json", lambda d: {**d, "claims": {**d["claims"], region: claim}, "applied": {
        n: {**heads, region: line_hash(entries[int(n) - 1].line())} for n, heads in d["applied"].items()}})
    edit_json(run_dir / "final" / "teacher.json", lambda d: {**d, "privacy": {**d["privacy"], region: claim}})


def test_a_rewritten_and_rechained_ledger_fails_unless_signed_by_the_regions_key(one_run, tmp_path):
    run, states = one_run
    region_key = read_public_key(states["eu"])
    spent = audit([states["eu"]]).regions["eu"].epsilon_recorded

    forge(states["eu"], None, 3.0)          # larger σ, ε recomputed, re-chained, claims updated
    rewrite_claims(tmp_path / "run", states["eu"], "eu")
    report = audit([tmp_path / "run", *states.values()])
    assert not report.ok and "does not carry a valid signature" in report.regions["eu"].problems[0]

    forger = SigningKey.load_or_create(tmp_path / "forger")      # re-signed with the forger's own key
    forge(states["eu"], forger, 1.0)
    forge(states["eu"], forger, 3.0)
    rewrite_claims(tmp_path / "run", states["eu"], "eu")
    report = audit([tmp_path / "run", *states.values()])
    assert report.regions["eu"].epsilon_recorded < spent / 2, "the forgery is self-consistent"
    assert not report.ok and "signing.pub is" in report.regions["eu"].problems[0]

    shutil.copy(tmp_path / "forger" / "signing.pub", states["eu"] / "signing.pub")   # ... and its key file
    assert audit([tmp_path / "run", *states.values()]).ok, "only a pinned key can tell now"
    pinned = audit([tmp_path / "run", *states.values()], keys={"eu": region_key})
    assert not pinned.ok and "not the pinned key" in pinned.regions["eu"].problems[0]
    cli = subprocess.run([sys.executable, "-m", "fedrec.tools", "audit", str(tmp_path / "run"), str(states["eu"]),
                          "--key", f"eu={region_key}"], capture_output=True, text=True)
    assert cli.returncode == 1 and "not the pinned key" in cli.stdout


@pytest.mark.parametrize("accountant, epsilon", [("rdp", 8.0), ("prv", 0.1)])
def test_looser_accountants_and_small_budgets_pass_and_are_reported_conservative(tmp_path, catalog, accountant, epsilon):
    states = {"eu": tmp_path / "eu"}
    federated_run(tmp_path / "run", states, {"eu": RegionBudget(epsilon=epsilon, delta=1e-5, accountant=accountant)},
                  3, catalog)
    report = audit([tmp_path / "run", states["eu"]])
    assert report.ok, report.problems
    eu = report.regions["eu"]
    assert eu.epsilon_recorded <= epsilon and eu.epsilon_recorded >= eu.epsilon_pld * 0.99 - 0.005
    assert eu.conservative_by == pytest.approx(eu.epsilon_recorded / eu.epsilon_pld - 1, rel=1e-9)
    if accountant == "rdp":
        assert eu.conservative_by > 0.03, "RDP is looser than PLD by design"


def test_a_recorded_epsilon_below_pld_fails(tmp_path):
    """An accountant that under-counts (here: a ledger whose accountant reports half the ε, signed
    by the region itself) is caught by the independent PLD computation."""
    key = SigningKey.load_or_create(tmp_path)
    budget = RegionBudget(epsilon=8.0, delta=1e-5, noise_multiplier=1.0)
    privacy = RegionPrivacy("eu", budget, tmp_path)
    decision = privacy.plan_round(USERS, BATCH, 1.0, 3, "run")
    entry = privacy.record(decision, 1)
    pld = pld_epsilon(segments([entry]), 1e-5)
    assert entry.epsilon >= pld * 0.99 - 0.005
    write_json(tmp_path / "decoy.json", {})          # unrelated files are ignored
    (tmp_path / "ledger.jsonl").unlink()
    half = LedgerEntry(**{**entry.__dict__, "epsilon": entry.epsilon / 2, "signature": ""})
    half = LedgerEntry(**{**half.__dict__, "signature": key.sign(half.signed_bytes())})
    (tmp_path / "ledger.jsonl").write_text(half.line() + "\n")
    problems = audit([tmp_path]).regions["eu"].problems
    assert any("below dp-accounting PLD" in p for p in problems) and any("recorded ε" in p for p in problems)


def test_train_dp_spends_from_the_regions_ledger_and_its_checkpoint_audits(tiny_encoder, prepared, tmp_path):
    state = tmp_path / "eu-records"
    command = [sys.executable, "-m", "fedrec.tools", "train", "--dp", "--data", str(prepared), "--regions", "eu",
               "--encoder", str(tiny_encoder), "--state-dir", str(state), "--epsilon", "6", "--delta", "1e-4",
               "--set", "federation.rounds=1", "--set", "train.batch_size=8"]
    for name in ("first", "second"):
        done = subprocess.run(command + ["--out", str(tmp_path / name)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "round 1/1: lifetime ε" in done.stdout
    entries = RegionPrivacy("eu", RegionBudget(), state).ledger.entries()
    assert [e.round for e in entries] == [1, 1] and len({e.run for e in entries}) == 2
    assert entries[-1].epsilon == pytest.approx(opacus_epsilon(segments(entries), 1e-4), rel=1e-9)
    assert entries[-1].epsilon <= 6
    for name in ("first", "second"):
        report = audit([state], bundle=tmp_path / name)
        assert report.ok, report.problems
    claim = json.loads((tmp_path / "second" / "teacher.json").read_text())["privacy"]["eu"]
    assert claim["epsilon"] == entries[-1].epsilon and claim["run"] == entries[-1].run
    refused = subprocess.run(command[:-4] + ["--regions", "all", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert refused.returncode == 2 and "--dp trains one region's data" in refused.stderr


def test_a_round_records_its_spend_when_it_ends_cleanly_and_its_claim_only_after(tmp_path):
    """`RegionPrivacy.round` is the protocol: plan under the lock, train, entry on clean exit."""
    privacy = RegionPrivacy("eu", RegionBudget(epsilon=8.0, delta=1e-5), tmp_path / "state")
    with pytest.raises(RuntimeError, match="training failed"):
        with privacy.round(USERS, BATCH, 1.0, 3, "run-a", 1) as spend:
            assert spend.allowed and spend.plan.users == USERS
            with pytest.raises(FedrecError, match="release the update after it"):
                spend.claim()
            raise RuntimeError("training failed")       # nothing was released: nothing is recorded
    assert privacy.ledger.entries() == []
    with privacy.round(USERS, BATCH, 1.0, 3, "run-a", 1) as spend:
        pass
    [entry] = privacy.ledger.entries()
    assert spend.claim() == PrivacyClaim.of_entry(entry) and (entry.run, entry.round) == ("run-a", 1)
    smaller = RegionPrivacy("eu", RegionBudget(epsilon=entry.epsilon / 2, delta=1e-5), tmp_path / "state")
    with smaller.round(USERS, BATCH, 1.0, 3, "run-b", 1) as declined:
        assert not declined.allowed and "declines" in declined.decision.reason
    assert len(privacy.ledger.entries()) == 1
    with pytest.raises(FedrecError, match="declined"):
        declined.plan
