"""User-level DP-SGD, accounting and the ledger, with real Opacus and dp-accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.errors import FedrecError
from fedrec.model.teacher import Teacher
from fedrec.privacy.accountant import noise_for_budget, opacus_epsilon, pld_epsilon
from fedrec.privacy.audit import audit
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.dp_sgd import mean_user_gradients, per_user_gradients, train_private
from fedrec.privacy.plan import DPPlan
from fedrec.privacy.ledger import Ledger, LedgerError
from fedrec.privacy.spend import RegionPrivacy, segments
from fedrec.training.objective import Example, RetrievalObjective, batch_inputs, can_train


def objective_for(tiny_encoder, prepared, perturb=0.1):
    silos = load_dataset(prepared)
    torch.manual_seed(0)
    teacher = Teacher(FedrecConfig.from_flat({"model.encoder": str(tiny_encoder)}).model, silos["uk"].catalog)
    with torch.no_grad():        # non-zero item vectors, so every tensor gets a gradient
        teacher.tower.item_vectors.add_(perturb * torch.randn_like(teacher.tower.item_vectors))
    return RetrievalObjective(teacher.tower), silos


def example(history, targets, ages=None) -> Example:
    history = np.array(history)
    return Example(history, np.zeros(len(history), dtype=np.int64) if ages is None else np.array(ages), np.array(targets))


def flat(grads: dict, row: int) -> torch.Tensor:
    return torch.cat([g[row].flatten() for g in grads.values()])


def test_changing_one_user_changes_only_that_users_per_sample_gradient(tiny_encoder, prepared):
    objective, _ = objective_for(tiny_encoder, prepared)
    rng = np.random.default_rng(0)
    examples = [example([1, 2, 3], [4]), example([5, 6], [7, 8], [0, 1]), example([8, 9], [10]), example([11], [12])]
    changed = list(examples)
    changed[2] = example([20, 21, 22], [23, 24, 25], [0, 1, 1])
    before = per_user_gradients(objective, batch_inputs(examples, 50, 64, rng))
    after = per_user_gradients(objective, batch_inputs(changed, 50, 64, rng))
    for i in (0, 1, 3):
        torch.testing.assert_close(flat(before, i), flat(after, i), atol=1e-6, rtol=1e-5)
    assert (flat(before, 2) - flat(after, 2)).norm() > 1e-4
    # each per-user gradient is plain autograd on that user's example alone
    params = dict(objective.named_parameters())
    for i in range(len(examples)):
        loss = objective(**batch_inputs([examples[i]], 50, 64, rng))[0]
        alone = torch.autograd.grad(loss, list(params.values()))
        torch.testing.assert_close(flat(before, i), torch.cat([g.flatten() for g in alone]), atol=3e-5, rtol=1e-3)


def test_shared_parameters_gradients_are_scaled_before_clipping_and_the_rest_untouched(tiny_encoder, prepared):
    objective, _ = objective_for(tiny_encoder, prepared)
    names = {name for name, _ in objective.named_parameters()}
    shared = {f"tower.{name}" for name in objective.tower.SHARED}
    assert shared < names and "tower.item_vectors" not in shared and "tower.text_adapter" not in shared
    inputs = batch_inputs([example([1, 2, 3], [4]), example([5, 6], [7, 8], [0, 1])], 50, 64, np.random.default_rng(0))
    plain = per_user_gradients(objective, inputs)
    scaled = per_user_gradients(objective, inputs, shared_scale=0.1)
    for name in names:
        torch.testing.assert_close(scaled[name], plain[name] * (0.1 if name in shared else 1.0))
    # per user, the scaled parameters weigh less in the norm that clipping bounds
    share = lambda grads: sum(grads[n][0].pow(2).sum() for n in shared) / sum(g[0].pow(2).sum() for g in grads.values())
    assert share(scaled) < share(plain) and share(plain) > 0


def test_a_users_row_is_the_mean_of_their_own_examples_gradients_alone(tiny_encoder, prepared):
    objective, _ = objective_for(tiny_encoder, prepared)
    cfg = FedrecConfig().train
    rng = np.random.default_rng(0)
    own = [[example([1, 2], [3]), example([3, 1, 2], [4, 5], [0, 1, 1]), example([6], [7])],
           [example([8], [9])],
           [example([10, 11], [12]), example([12], [10])]]
    rows = mean_user_gradients(objective, own, cfg, rng, torch.device("cpu"))
    for user, examples in enumerate(own):
        alone = [per_user_gradients(objective, batch_inputs([e], 50, 64, rng), shared_scale=cfg.dp_shared_scale)
                 for e in examples]
        mean = torch.stack([flat(g, 0) for g in alone]).mean(0)
        torch.testing.assert_close(flat(rows, user), mean, atol=3e-5, rtol=1e-3)
    other = [own[0], [example([20, 21], [22]), example([22], [23])], own[2]]
    changed = mean_user_gradients(objective, other, cfg, rng, torch.device("cpu"))
    for user in (0, 2):
        torch.testing.assert_close(flat(changed, user), flat(rows, user), atol=1e-6, rtol=1e-5)


def test_dp_round_changes_the_tower(tiny_encoder, prepared):
    objective, silos = objective_for(tiny_encoder, prepared, perturb=0.0)
    users = [u for u in silos["uk"].users if can_train(u)]
    before = {k: v.detach().clone() for k, v in objective.tower.named_parameters()}
    cfg = FedrecConfig.from_flat({"train.lr": 0.01}).train
    assert train_private(objective, users, cfg, DPPlan(len(users), 0.25, 3, 1.0, 1.0)) is None   # nothing private out
    for name, value in objective.tower.named_parameters():
        assert not torch.allclose(before[name], value), f"{name} did not move under DP"
        assert getattr(value, "grad_sample", None) is None


def test_identical_seeds_never_release_identical_noise(tiny_encoder, prepared):
    """Two releases sharing their noise would cancel it in their difference; the accountant
    composes them as independent, so every DP round draws fresh noise whatever the seeds."""
    released = []
    for _ in range(2):
        objective, silos = objective_for(tiny_encoder, prepared, perturb=0.0)   # seeds torch with 0
        users = [u for u in silos["uk"].users if can_train(u)]
        train_private(objective, users, FedrecConfig().train, DPPlan(len(users), 0.25, 1, 1.0, 1.0))
        released.append({k: v.detach().numpy().copy() for k, v in objective.tower.named_parameters()})
    # Adam's first step is ±lr per coordinate, so a one-number tensor agrees in sign half the
    # time; with independent noise about half of all coordinates must differ, with shared noise none.
    differ = np.concatenate([(np.abs(released[0][k] - released[1][k]) > 1e-6).ravel() for k in released[0]])
    assert differ.mean() > 0.25, "the same seeds gave the same noise"


@pytest.mark.parametrize("sigma, clip, batch", [(1.0, 1.0, 8), (0.7, 2.0, 32)])
def test_noise_std_matches_sigma_c_over_b(tiny_encoder, prepared, sigma, clip, batch):
    objective, _ = objective_for(tiny_encoder, prepared)
    params = list(objective.parameters())
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                            expected_batch_size=batch)
    samples = []
    for _ in range(5):
        optimizer.zero_grad()
        for p in params:                          # four users, all with zero gradients
            p.grad_sample = torch.zeros((4, *p.shape))
        assert optimizer.pre_step()
        samples.append(torch.cat([p.grad.flatten() for p in params]))
    noise = torch.cat(samples)
    expected = sigma * clip / batch
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5
    assert noise.std().item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 1000), (0.05, 0.8, 200), (0.2, 1.5, 50), (0.1, 2.0, 30)])
def test_opacus_prv_agrees_with_dp_accounting_pld(q, sigma, steps):
    prv = opacus_epsilon([(sigma, q, steps)], 1e-5, "prv")
    pld = pld_epsilon([(sigma, q, steps)], 1e-5)
    assert prv == pytest.approx(pld, rel=0.05)
    assert opacus_epsilon([(sigma, q, steps)], 1e-5, "rdp") >= prv    # RDP is the looser bound


def test_derived_sigma_meets_the_budget_over_the_whole_run():
    sigma = noise_for_budget(3.0, 1e-5, 0.05, 200)
    assert opacus_epsilon([(sigma, 0.05, 200)], 1e-5) <= 3.0
    assert opacus_epsilon([(sigma * 0.9, 0.05, 200)], 1e-5) > 3.0 * 0.98


SPEND_ONE_ROUND = """
import sys
import time
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.spend import RegionPrivacy, segments
privacy = RegionPrivacy("eu", RegionBudget(epsilon=50, delta=1e-5), sys.argv[1])
decision = privacy.plan_round(users=400, batch_size=40, local_epochs=1, planned_rounds=4, run="run")
print(privacy.record(decision, int(sys.argv[2])).epsilon)
"""


def test_cumulative_epsilon_across_processes_equals_one_accountant(tmp_path):
    eps = [float(subprocess.run([sys.executable, "-c", SPEND_ONE_ROUND, str(tmp_path), str(r)],
                                capture_output=True, text=True, check=True).stdout) for r in (1, 2, 3)]
    entries = Ledger(tmp_path / "ledger.jsonl").entries()
    assert [e.round for e in entries] == [1, 2, 3] and eps == [e.epsilon for e in entries]
    sigma, q = entries[0].noise_multiplier, entries[0].sample_rate
    assert all(e.noise_multiplier == sigma for e in entries), "σ is fixed for the whole run"
    one_accountant = opacus_epsilon([(sigma, q, sum(e.steps for e in entries))], 1e-5)
    assert eps[-1] == pytest.approx(one_accountant, rel=1e-9)
    assert eps[0] < eps[1] < eps[2]


def test_budget_declines_the_round_that_would_overspend(tmp_path):
    privacy = RegionPrivacy("row", RegionBudget(epsilon=2.0, delta=1e-4, noise_multiplier=2.0), tmp_path)
    recorded = 0
    for server_round in range(1, 30):
        decision = privacy.plan_round(users=100, batch_size=20, local_epochs=1, planned_rounds=3, run="run")
        if not decision.allowed:
            break
        privacy.record(decision, server_round)
        recorded += 1
    assert 0 < recorded < 29
    assert "declines" in decision.reason and decision.projected_epsilon > 2.0
    assert privacy.spent() <= 2.0 and len(privacy.ledger.entries()) == recorded
    with pytest.raises(FedrecError, match="cannot record"):
        privacy.record(decision, 99)


def test_delta_must_be_below_one_over_users(tmp_path):
    privacy = RegionPrivacy("row", RegionBudget(epsilon=8, delta=0.01), tmp_path)
    with pytest.raises(FedrecError, match="not below 1/users"):
        privacy.plan_round(users=200, batch_size=10, local_epochs=1, planned_rounds=1, run="run")


CONCURRENT_SPEND = """
import sys, time
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.spend import RegionPrivacy, segments
privacy = RegionPrivacy("eu", RegionBudget(epsilon=50.0, delta=1e-5, noise_multiplier=1.0), sys.argv[1])
with privacy.exclusive():
    decision = privacy.plan_round(1000, 100, 1.0, 2, "run")
    time.sleep(1.0)                   # without the lock both would plan on the empty history here
    privacy.record(decision, int(sys.argv[2]))
"""


def test_two_rounds_at_once_in_one_region_are_serialised(tmp_path):
    rounds = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SPEND, str(tmp_path), str(r)]) for r in (1, 2)]
    assert [p.wait(120) for p in rounds] == [0, 0]
    entries = Ledger(tmp_path / "ledger.jsonl").entries()
    assert sorted(e.round for e in entries) == [1, 2]
    assert entries[1].epsilon > entries[0].epsilon, "the second plan saw the first spend"
    assert entries[1].epsilon == pytest.approx(opacus_epsilon(segments(entries), 1e-5), rel=1e-9)


def test_a_round_waits_for_a_held_ledger_only_so_long_and_names_the_holder(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with ledger.lock():                      # a hung round holding the region's spend lock
        started = time.monotonic()
        holder = f"still locked by another round \\(last recorded holder: process {os.getpid()}\\) after 0.3s"
        with pytest.raises(LedgerError, match=holder):
            with Ledger(tmp_path / "ledger.jsonl").lock(timeout=0.3):
                pytest.fail("two holders at once")
        assert time.monotonic() - started >= 0.3
    with ledger.lock(timeout=0.3):           # released: the next round gets it at once
        assert (tmp_path / "ledger.jsonl.lock").read_text() == str(os.getpid())


def test_tampered_ledgers_are_detected(tmp_path):
    privacy = RegionPrivacy("eu", RegionBudget(epsilon=50, delta=1e-5, noise_multiplier=1.0), tmp_path)
    for r in (1, 2, 3):
        privacy.record(privacy.plan_round(400, 40, 1, 3, run="run"), r)
    path = privacy.ledger.path
    lines = path.read_text().splitlines()

    def broken(text):
        path.write_text(text)
        with pytest.raises(LedgerError) as info:
            Ledger(path).entries()
        return str(info.value)

    edited = json.loads(lines[1])
    edited["epsilon"] = 0.01
    edited_ledger = "\n".join([lines[0], json.dumps(edited, sort_keys=True, separators=(",", ":")), lines[2]]) + "\n"
    assert "entry 2 does not carry a valid signature" in broken(edited_ledger)
    assert "entry 2" in broken("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    assert "entry 1" in broken("\n".join(lines[1:]) + "\n")
    assert "entry 3" in broken("\n".join(lines[:2] + [lines[2][:40]]) + "\n")


def test_a_torn_last_entry_fails_closed_until_repaired_and_repair_cuts_only_that(tmp_path):
    privacy = RegionPrivacy("eu", RegionBudget(epsilon=50, delta=1e-5, noise_multiplier=1.0), tmp_path)
    for r in (1, 2, 3):
        privacy.record(privacy.plan_round(400, 40, 1, 3, run="run"), r)
    path, whole = privacy.ledger.path, privacy.ledger.path.read_bytes()
    two = whole[:whole.rindex(b"\n", 0, len(whole) - 1) + 1]
    spent_after_two = opacus_epsilon(segments(Ledger(path).entries()[:2]), 1e-5)

    def repair():
        return subprocess.run([sys.executable, "-m", "fedrec.tools", "privacy", "repair-ledger", str(tmp_path)],
                              capture_output=True, text=True)

    path.write_bytes(whole[:-25])                    # killed inside the write of entry 3
    with pytest.raises(LedgerError, match="last entry is incomplete.*repair-ledger"):
        Ledger(path).entries()
    with pytest.raises(LedgerError, match="incomplete"):
        privacy.record(privacy.plan_round(400, 40, 1, 3, run="run"), 4)
    assert path.read_bytes() == whole[:-25], "nothing appended after a torn entry"
    assert not audit([tmp_path]).ok

    fixed = repair()
    assert fixed.returncode == 0 and "cut off a torn last entry of" in fixed.stdout, fixed.stderr
    assert path.read_bytes() == two
    assert [p.read_bytes() for p in tmp_path.glob("ledger.jsonl.torn-*")] == [whole[len(two):-25]]
    assert audit([tmp_path]).ok and privacy.spent() == pytest.approx(spent_after_two, rel=1e-9)
    assert "nothing to repair" in repair().stdout

    path.write_bytes(whole[:-1])                     # whole entry, newline lost: kept and counted
    assert "added it (3 entries)" in repair().stdout and path.read_bytes() == whole

    damaged = whole.replace(b'"round":1', b'"round":7', 1)[:-25]   # other damage is never "repaired"
    third = whole[len(two):-1]
    forged = two + third.replace(json.loads(third)["prev_sha256"].encode(), b"0" * 64)   # whole, off the chain
    for bad, entry in ((damaged, "entry 1"), (forged, "entry 3")):
        path.write_bytes(bad)
        refused = repair()
        assert refused.returncode != 0 and entry in refused.stderr + refused.stdout, refused.stdout
        assert path.read_bytes() == bad
