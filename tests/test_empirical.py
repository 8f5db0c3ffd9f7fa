"""The empirical privacy audit: the one-run bound by hand, and real DP-SGD (Opacus) runs showing the
audit has power (noise off, a broken sampler) while canaries stay out of everything shipped."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from fedrec.errors import FedrecError
from fedrec.privacy.one_run_bound import bound_ceiling, epsilon_lower_bound, p_value

CANARIES, GUESSES = 100, 40
# Four expected passes: nearly every included canary is sampled (1 − e⁻⁴), so with the noise off
# the canaries show; under DP at σ = 1 they do not.
SETTINGS = {"train.batch_size": 1, "federation.rounds": 1, "federation.local_epochs": 4.0}
# The broken sampler's run: with 200 canaries (about 130 users) and batch 1, q ≈ 1/130 keeps the
# accounted ε of one pass at σ = 1 near 0.6, a bound the ceiling for 200 canaries and 40 guesses
# (2.5) can exceed when every user trains in every step.
BROKEN_CANARIES, BROKEN_SETTINGS = 200, {**SETTINGS, "federation.local_epochs": 1.0}
SLOW = pytest.mark.timeout(1500)        # the broken run trains every user in each of its ~130 steps


def test_p_value_matches_a_hand_worked_case():
    # m=10, r=4, v=4, ε=ln 3 → q=3/4: P[Bin(4,¾) ≥ 4] = 81/256; the δ term's worst ratio is at
    # i=1, P[Bin = 3] = 108/256; p = 81/256 + 2·10·0.01·108/256 = 102.6/256.
    assert p_value(10, 4, 4, math.log(3), 0.01) == pytest.approx(102.6 / 256, abs=1e-12)


def test_pure_dp_bound_matches_the_closed_form():
    # δ=0, 5 of 5 right at 95 %: q⁵ = 0.05, so ε = ln(q / (1 − q)) with q = 0.05^(1/5).
    q = 0.05 ** 0.2
    assert epsilon_lower_bound(5, 5, 5, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_bound_is_zero_at_chance_and_the_ceiling_when_all_right():
    assert epsilon_lower_bound(200, 40, 20, 1e-5) == 0.0
    assert bound_ceiling(200, 40, 1e-5) == epsilon_lower_bound(200, 40, 40, 1e-5)
    assert epsilon_lower_bound(200, 40, 34, 1e-5) < bound_ceiling(200, 40, 1e-5)
    with pytest.raises(FedrecError, match="correct ≤ guesses"):
        epsilon_lower_bound(10, 4, 5, 1e-5)


def every_user_every_step(rng: np.random.Generator, users: int, sample_rate: float) -> np.ndarray:
    """The broken sampler: no subsampling at all, while the accountant assumes Poisson at rate q."""
    return np.arange(users)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def canary_traces(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and b"audit canary" in p.read_bytes()]


@pytest.fixture(scope="module")
def audits(prepared, tiny_encoder, tmp_path_factory):
    from fedrec.config import FedrecConfig
    from fedrec.data.silo import load_silo
    from fedrec.privacy.budget import RegionBudget
    from fedrec.privacy.empirical import empirical_audit

    config = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), **SETTINGS})
    silo = load_silo(prepared / "uk")
    budget = RegionBudget(epsilon=8.0, noise_multiplier=1.0)
    root = tmp_path_factory.mktemp("empirical")
    silo_before = tree_digest(prepared / "uk")
    runs = {name: empirical_audit("uk", silo, budget, root / name, config, CANARIES, GUESSES, noise=noise)
            for name, noise in (("dp", True), ("noise-off", False))}
    runs["broken"] = empirical_audit("uk", silo, budget, root / "broken",
                                     FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), **BROKEN_SETTINGS}),
                                     BROKEN_CANARIES, GUESSES, sampler=every_user_every_step)
    return {"runs": runs, "root": root, "config": config, "budget": budget,
            "silo_unchanged": tree_digest(prepared / "uk") == silo_before}


@SLOW
def test_broken_sampler_fails_the_audit(audits):
    broken = audits["runs"]["broken"]
    assert broken.lower_bound > broken.accounted_epsilon, broken
    assert not broken.ok


@SLOW
def test_noise_off_shows_a_clearly_higher_bound_than_dp(audits):
    dp, off = audits["runs"]["dp"], audits["runs"]["noise-off"]
    assert dp.ok and dp.lower_bound <= dp.accounted_epsilon
    assert off.lower_bound >= 1.0 and off.lower_bound > dp.lower_bound, (dp, off)
    assert math.isinf(off.accounted_epsilon) and off.run == "" and off.noise_multiplier == 0.0
    assert off.ceiling == pytest.approx(bound_ceiling(CANARIES, GUESSES, 1e-5))


@SLOW
def test_the_audit_spend_is_in_the_ledger_and_privacy_status(audits):
    from fedrec.privacy.ledger import Ledger
    from fedrec.privacy.status import format_status, region_status

    dp = audits["runs"]["dp"]
    entries = Ledger(audits["root"] / "dp" / "ledger.jsonl").entries()
    assert [e.run for e in entries] == [dp.run] and dp.run.startswith("audit-")
    entry = entries[0]
    assert (entry.users, entry.steps, entry.noise_multiplier) == (dp.users, dp.steps, 1.0)
    assert entry.epsilon == pytest.approx(dp.lifetime_epsilon) == pytest.approx(dp.accounted_epsilon)
    assert dp.run in format_status(region_status(audits["root"] / "dp"))
    assert not (audits["root"] / "noise-off" / "ledger.jsonl").exists()      # the control spent nothing


@SLOW
def test_canaries_never_reach_the_data_a_checkpoint_or_a_non_audit_entry(audits, prepared, tmp_path):
    from fedrec.data.silo import Catalog, load_silo
    from fedrec.export.bundle import export_bundle
    from fedrec.federation.region import RegionSettings, train_alone
    from fedrec.privacy.ledger import Ledger
    from fedrec.training.objective import can_train

    assert audits["silo_unchanged"]
    state = audits["root"] / "dp"
    settings = RegionSettings("uk", str(prepared / "uk"), str(state), audits["budget"])
    checkpoint = train_alone(settings, audits["config"], tmp_path / "teacher")
    bundle = export_bundle(checkpoint, Catalog.load(prepared / "catalog.parquet"), tmp_path / "bundle", int8=False)
    assert canary_traces(checkpoint) == [] and canary_traces(bundle) == [] and canary_traces(state) == []
    real_users = sum(can_train(u) for u in load_silo(prepared / "uk").users)
    later = [e for e in Ledger(state / "ledger.jsonl").entries() if not e.run.startswith("audit-")]
    assert later and all(e.users == real_users for e in later)


def test_refuses_when_the_budget_cannot_afford_it(prepared, tiny_encoder, tmp_path):
    from fedrec.config import FedrecConfig
    from fedrec.data.silo import load_silo
    from fedrec.privacy.budget import RegionBudget
    from fedrec.privacy.empirical import empirical_audit

    config = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), **SETTINGS})
    with pytest.raises(FedrecError, match="the empirical audit .* refused"):
        empirical_audit("uk", load_silo(prepared / "uk"), RegionBudget(epsilon=0.05, noise_multiplier=1.0),
                        tmp_path, config, CANARIES, GUESSES)
    assert not (tmp_path / "ledger.jsonl").exists()


def test_empirical_audit_refuses_bad_requests_before_spending(prepared, tiny_encoder, tmp_path):
    from typer.testing import CliRunner

    from fedrec.config import FedrecConfig
    from fedrec.data.silo import load_silo
    from fedrec.privacy.budget import RegionBudget
    from fedrec.privacy.empirical import empirical_audit
    from fedrec.tools.cli import app

    ledger = tmp_path / "ledger.jsonl"
    for args, message in (([str(tmp_path), "--empirical", "--data", str(prepared), "--regions", "mars"],
                           "unknown region(s) mars"),
                          ([str(tmp_path), "--empirical"], "--empirical trains on the regions' data")):
        result = CliRunner().invoke(app, ["audit", *args])
        assert isinstance(result.exception, FedrecError) and message in str(result.exception)
    config = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), **SETTINGS})
    with pytest.raises(FedrecError, match="trains without DP"):
        empirical_audit("uk", load_silo(prepared / "uk"), RegionBudget(enabled=False), tmp_path, config)
    assert not ledger.exists()


def test_fedrec_audit_empirical_trains_reports_and_records_from_the_command_line(prepared, tiny_encoder, tmp_path):
    """The privacy officer's path end to end: the real `fedrec` command trains the scratch copy,
    prints and writes the bound beside the accounted ε, and the audit spend is in the ledger."""
    import json
    import subprocess
    import sys

    from fedrec.privacy.ledger import Ledger

    state, report = tmp_path / "state", tmp_path / "audit.json"
    settings = {"model.encoder": str(tiny_encoder), **SETTINGS, "federation.local_epochs": 1.0}
    run = subprocess.run([sys.executable, "-m", "fedrec.tools", "audit", str(state / "row"), "--empirical",
                          "--data", str(prepared), "--regions", "row", "--state-root", str(state),
                          "--canaries", "40", "--no-control", "--epsilon", "8", "--noise-multiplier", "1",
                          "--json", str(report), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (measured,) = json.loads(report.read_text())["empirical"]
    assert measured["region"] == "row" and measured["canaries"] == 40 and measured["ok"]
    assert 0 <= measured["lower_bound"] <= measured["accounted_epsilon"] < 8
    assert "row" in run.stdout and f"{measured['accounted_epsilon']:.3f}" in run.stdout
    (entry,) = Ledger(state / "row" / "ledger.jsonl").entries()
    assert entry.run == measured["run"] and entry.run.startswith("audit-")
