"""Server-side aggregation and the Flower app manifest."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedrec.config import FederationConfig, FedrecConfig
from fedrec.errors import FedrecError
from fedrec.federation.app_manifest import render
from fedrec.federation.strategy import Aggregator, RegionUpdate

GLOBAL = {"a": np.zeros(3, dtype=np.float32), "b": np.ones((2, 2), dtype=np.float32)}


def update(region, a, b, n):
    return RegionUpdate(region, {"a": np.asarray(a, dtype=np.float32), "b": np.full((2, 2), b, dtype=np.float32)}, n)


def test_fedavg_is_the_example_weighted_mean():
    updates = [update("uk", [1, 2, 3], 3.0, 30), update("eu", [4, 5, 6], 0.0, 10)]
    new, norms = Aggregator(FederationConfig()).aggregate(GLOBAL, updates)
    np.testing.assert_allclose(new["a"], [1.75, 2.75, 3.75])
    np.testing.assert_allclose(new["b"], np.full((2, 2), 2.25))
    assert norms["uk"] == pytest.approx(np.sqrt(1 + 4 + 9 + 4 * 4))


def test_clipping_bounds_a_poisoned_update():
    honest = update("uk", [0.1, 0.1, 0.1], 1.1, 50)
    poisoned = update("row", [100.0, -100.0, 100.0], 101.0, 50)
    config = FederationConfig(clip_update_norm=1.0)
    new, norms = Aggregator(config).aggregate(GLOBAL, [honest, poisoned])
    moved = np.sqrt(sum(np.sum((new[k] - GLOBAL[k]) ** 2) for k in GLOBAL))
    assert norms["row"] > 100 and moved <= 1.0 + 1e-6


def test_fedadam_keeps_moments_and_steps_by_server_lr():
    aggregator = Aggregator(FederationConfig(strategy="fedadam", server_lr=0.1))
    new, _ = aggregator.aggregate(GLOBAL, [update("uk", [1, -1, 0], 1.0, 5)])
    # first Adam step: m = 0.1 g, v = 0.01 g², step = lr · m / (√v + τ) ≈ lr · sign(g)
    np.testing.assert_allclose(new["a"], [0.1 * 0.1 / (0.1 + 1e-3), -0.1 * 0.1 / (0.1 + 1e-3), 0.0], rtol=1e-5)
    assert set(aggregator.moments) == {"m", "v"}


def test_bad_strategy_and_nan_updates_are_refused():
    with pytest.raises(FedrecError, match="unknown strategy"):
        Aggregator(FederationConfig(strategy="fedsgd"))
    with pytest.raises(FedrecError, match="non-finite"):
        Aggregator(FederationConfig()).aggregate(GLOBAL, [update("row", [np.nan, 0, 0], 1.0, 5)])


def test_flower_app_manifest_is_generated_from_the_typed_config():
    path = Path(__file__).resolve().parents[1] / "federation" / "fedrec-app" / "pyproject.toml"
    assert path.read_text() == render(), "run `python -m fedrec.federation.app_manifest`"
    manifest = tomllib.loads(path.read_text())
    config = manifest["tool"]["flwr"]["app"]["config"]
    flat = {f"{section}.{key}": value for section, table in config.items() for key, value in table.items()}
    assert flat == FedrecConfig().to_flat()
    assert manifest["tool"]["flwr"]["app"]["components"]["clientapp"] == "fedrec.federation.client_app:app"


def test_coordinator_rejects_malformed_updates_instead_of_failing():
    from fedrec.federation.coordinator import invalid_update

    assert invalid_update({"a": np.zeros(3), "b": np.ones((2, 2))}, GLOBAL) == ""
    assert "non-finite" in invalid_update({"a": np.array([0, np.inf, 0]), "b": np.ones((2, 2))}, GLOBAL)
    assert "shape" in invalid_update({"a": np.zeros(4), "b": np.ones((2, 2))}, GLOBAL)
    assert "do not match" in invalid_update({"a": np.zeros(3)}, GLOBAL)


def test_coordinator_accepts_a_dp_update_only_with_a_well_formed_claim_from_the_same_key(tmp_path):
    from fedrec.federation.coordinator import region_claim
    from fedrec.privacy.budget import RegionBudget
    from fedrec.privacy.claims import PrivacyClaim
    from fedrec.privacy.spend import RegionPrivacy

    privacy = RegionPrivacy("eu", RegionBudget(epsilon=8, delta=1e-5, noise_multiplier=1.0), tmp_path / "eu")
    entry = privacy.record(privacy.plan_round(400, 40, 1, 2, run="run"), 1)
    sent = {"region": "eu", "dp": True, **PrivacyClaim.of_entry(entry).to_json()}
    claim, problem = region_claim(sent, None)
    assert problem == "" and claim == PrivacyClaim.of_entry(entry)
    assert region_claim({"region": "uk", "dp": False}, None) == (None, "")
    assert "epsilon must be a finite number" in region_claim({**sent, "epsilon": "lots"}, None)[1]
    assert "round must be a whole number" in region_claim({k: v for k, v in sent.items() if k != "round"}, None)[1]
    other = RegionPrivacy("eu", RegionBudget(epsilon=8, delta=1e-5, noise_multiplier=1.0), tmp_path / "impostor")
    impostor = PrivacyClaim.of_entry(other.record(other.plan_round(400, 40, 1, 2, run="run"), 2))
    assert "not the key" in region_claim({**sent, **impostor.to_json()}, claim)[1]


@pytest.mark.parametrize("strategy, trim", [("fedmedian", 0.0), ("trimmed_mean", 0.25)])
def test_robust_rules_bound_a_poisoned_region(strategy, trim):
    honest = [update(r, [0.1 * i, 0.1, -0.1], 1.0 + 0.1 * i, 10) for i, r in enumerate(("uk", "eu", "ch", "de"))]
    poisoned = update("row", [100.0, -100.0, 100.0], 100.0, 1000)      # ×100 and claims many examples
    aggregator = Aggregator(FederationConfig(strategy=strategy, trim_fraction=trim))
    new, _ = aggregator.aggregate(GLOBAL, [*honest, poisoned])
    low = np.min([u.adapters["a"] for u in honest], axis=0)
    high = np.max([u.adapters["a"] for u in honest], axis=0)
    assert np.all(new["a"] >= low - 1e-6) and np.all(new["a"] <= high + 1e-6)
    fedavg, _ = Aggregator(FederationConfig()).aggregate(GLOBAL, [*honest, poisoned])
    assert np.abs(fedavg["a"]).max() > 50, "plain FedAvg is dragged along"


def test_a_region_with_another_catalog_refuses_to_train(prepared, tiny_encoder, tmp_path):
    """Item vectors are rows of the catalog: a region must not train a tower built for another one."""
    from fedrec.config import FedrecConfig
    from fedrec.federation.region import RegionSettings, train_round
    from fedrec.privacy.budget import RegionBudget

    settings = RegionSettings("eu", str(prepared / "eu"), str(tmp_path / "eu"), RegionBudget(epsilon=8, delta=1e-3))
    config = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder)})
    with pytest.raises(FedrecError, match="is not the coordinator's"):
        train_round(settings, config, {}, 1, "run", "0" * 64)
    assert not (tmp_path / "eu").exists(), "nothing spent, nothing written"


def test_a_regions_node_config_round_trips_through_its_settings(tmp_path):
    """One record for what a region's operator sets: written into the SuperNode, read back in the ClientApp."""
    from fedrec.federation.deployment import node_config_arg
    from fedrec.federation.region import RegionSettings
    from fedrec.privacy.budget import RegionBudget

    for budget in (RegionBudget(epsilon=3.5, delta=1e-6, max_grad_norm=0.5, noise_multiplier=1.25, accountant="rdp"),
                   RegionBudget(enabled=False)):
        settings = RegionSettings("eu", str(tmp_path / "eu"), str(tmp_path / "state"), budget)
        config = settings.node_config()
        as_flower_reads_it = tomllib.loads("\n".join(node_config_arg(config).split(" ")))
        assert RegionSettings.from_node_config(config) == settings
        assert RegionSettings.from_node_config(as_flower_reads_it) == settings
