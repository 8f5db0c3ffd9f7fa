"""The teacher on a tiny random encoder: it learns, only adapters change, users stay separate."""

from __future__ import annotations

import numpy as np
import torch

from fedrec.config import FedrecConfig
from fedrec.data.silo import load_dataset
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import EncoderRanker
from fedrec.model.teacher import Teacher
from fedrec.training.objective import Example, RetrievalObjective, can_train, sample_example
from fedrec.training.trainer import fit, make_optimizer


def tiny_teacher(tiny_encoder, **overrides) -> Teacher:
    cfg = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), **overrides})
    torch.manual_seed(0)
    return Teacher(cfg.model)


def test_training_lowers_loss_and_changes_only_adapters(tiny_encoder, prepared):
    silos = load_dataset(prepared)
    teacher = tiny_teacher(tiny_encoder)
    frozen = {n: p.detach().clone() for n, p in teacher.encoder.named_parameters() if not p.requires_grad}
    adapters_before = teacher.adapter_state()
    objective = RetrievalObjective(teacher, silos["uk"].catalog)
    objective.refresh_catalog()
    rng = np.random.default_rng(0)
    users = [u for u in silos["uk"].users if can_train(u)]
    batch = objective.inputs([sample_example(u, rng) for u in users[:16]])
    optimizer = make_optimizer(objective, FedrecConfig.from_flat({"train.lr": 0.05}).train)
    teacher.eval()   # no dropout: the same batch must give a comparable loss
    losses = []
    for _ in range(15):
        loss = objective(**batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = teacher.adapter_state()
    assert all(not np.allclose(adapters_before[n], after[n]) for n in after if "lora_A" in n)
    for name, p in teacher.encoder.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} must stay frozen"


def per_example_grads(objective, batch):
    grads = []
    losses = objective(**batch)
    for i in range(len(losses)):
        g = torch.autograd.grad(losses[i], list(objective.teacher.adapter_parameters().values()),
                                retain_graph=True, allow_unused=True)
        grads.append(torch.cat([x.flatten() for x in g if x is not None]))
    return losses.detach(), grads


def test_one_users_data_changes_only_that_users_loss_and_gradient(tiny_encoder, prepared):
    silos = load_dataset(prepared)
    catalog = silos["uk"].catalog
    teacher = tiny_teacher(tiny_encoder)
    # a non-zero LoRA B so that gradients reach lora_A too
    with torch.no_grad():
        for name, p in teacher.adapter_parameters().items():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval()
    objective = RetrievalObjective(teacher, catalog)
    objective.refresh_catalog()
    examples = [Example(np.array([1, 2, 3]), "", 4), Example(np.array([5, 6]), "", 7),
                Example(np.array([8]), "", 9)]
    changed = list(examples)
    changed[1] = Example(np.array([10, 11, 12, 13]), "garden", 14)
    losses_a, grads_a = per_example_grads(objective, objective.inputs(examples))
    losses_b, grads_b = per_example_grads(objective, objective.inputs(changed))
    for i in (0, 2):
        assert torch.allclose(losses_a[i], losses_b[i], atol=1e-6)
        assert torch.allclose(grads_a[i], grads_b[i], atol=1e-6)
    assert not torch.allclose(losses_a[1], losses_b[1])
    assert not torch.allclose(grads_a[1], grads_b[1])


def test_fit_saves_best_checkpoint_that_reloads(tiny_encoder, prepared, tmp_path):
    silos = load_dataset(prepared)
    config = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), "train.epochs": 2,
                                     "train.lr": 0.005, "train.batch_size": 16})
    torch.manual_seed(0)
    teacher = Teacher(config.model)
    result = fit(teacher, silos, config, tmp_path / "ckpt", log=lambda _: None)
    assert len(result.history) == 2 and (tmp_path / "ckpt" / "history.json").is_file()
    reloaded = Teacher.load(tmp_path / "ckpt")
    for name, value in teacher.adapter_state().items():
        np.testing.assert_array_equal(reloaded.adapter_state()[name], value)
    val = evaluate_ranker(EncoderRanker(reloaded, silos["uk"].catalog, 10), silos, "val")
    assert val["overall"]["ndcg@10"] == result.best_val_ndcg
