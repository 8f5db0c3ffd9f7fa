"""The teacher on a tiny random encoder: it learns, only the tower changes, users stay separate,
and search lands in the same space as recommendation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog, load_dataset
from fedrec.errors import FedrecError
from fedrec.evaluation.evaluate import evaluate_ranker
from fedrec.evaluation.rankers import TeacherRanker
from fedrec.model.teacher import FrozenEncoder, Teacher
from fedrec.training.objective import Example, RetrievalObjective, batch_inputs, can_train, sample_examples
from fedrec.training.trainer import fit, make_optimizer


def tiny_teacher(tiny_encoder, catalog, **overrides) -> Teacher:
    cfg = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), **overrides})
    torch.manual_seed(0)
    return Teacher(cfg.model, catalog)


def example(history, targets, ages=None) -> Example:
    history = np.array(history)
    return Example(history, np.zeros(len(history), dtype=np.int64) if ages is None else np.array(ages), np.array(targets))


def test_training_lowers_loss_and_changes_only_the_tower(tiny_encoder, prepared):
    silos = load_dataset(prepared)
    teacher = tiny_teacher(tiny_encoder, silos["uk"].catalog)
    frozen = {n: p.detach().clone() for n, p in teacher.encoder.named_parameters()}
    text = teacher.tower.text.clone()
    before = teacher.adapter_state()
    objective = RetrievalObjective(teacher.tower)
    rng = np.random.default_rng(0)
    users = [u for u in silos["uk"].users if can_train(u)]
    batch = batch_inputs([sample_examples(u, rng)[0] for u in users[:16]], 50, 64, rng)
    optimizer = make_optimizer(objective, FedrecConfig.from_flat({"train.lr": 0.01}).train)
    losses = []
    for _ in range(15):
        loss = objective(**batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = teacher.adapter_state()
    assert set(after) == {"text_adapter", "item_vectors", "item_bias", "ages", "head_queries", "head_outputs",
                          "empty_user", "text_weight"}
    assert all(not np.allclose(before[n], after[n]) for n in ("text_adapter", "item_vectors", "item_bias"))
    for name, p in teacher.encoder.named_parameters():
        assert torch.equal(p, frozen[name]), f"{name} must stay frozen"
    assert torch.equal(teacher.tower.text, text), "item text vectors come from the frozen encoder"


def test_one_users_data_changes_only_that_users_loss(tiny_encoder, prepared):
    catalog = Catalog.load(prepared / "catalog.parquet")
    teacher = tiny_teacher(tiny_encoder, catalog)
    with torch.no_grad():                  # non-zero item vectors, so every input matters
        teacher.tower.item_vectors.add_(0.1 * torch.randn_like(teacher.tower.item_vectors))
    objective = RetrievalObjective(teacher.tower)
    rng = np.random.default_rng(0)
    examples = [example([1, 2, 3], [4]), example([5, 6], [7, 8], [0, 1]), example([9], [10])]
    changed = list(examples)
    changed[1] = example([11, 12, 13, 14], [15], [0, 0, 1, 2])
    a = objective(**batch_inputs(examples, 50, 64, rng))
    b = objective(**batch_inputs(changed, 50, 64, rng))
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    assert not torch.allclose(a[1], b[1])


def test_history_items_are_never_predicted(tiny_encoder, prepared):
    """The loss masks the user's own history: putting a target in the history cannot help it."""
    teacher = tiny_teacher(tiny_encoder, Catalog.load(prepared / "catalog.parquet"))
    objective = RetrievalObjective(teacher.tower)
    rng = np.random.default_rng(0)
    inputs = batch_inputs([example([1, 2], [3])], 50, 64, rng)
    logits = teacher.tower.scores(teacher.tower.users(inputs["history"], inputs["ages"], inputs["mask"]))
    seen = torch.zeros_like(logits).scatter(1, inputs["history"], 1.0) > 0
    expected = -torch.log_softmax(logits.masked_fill(seen, -1e9), -1)[0, 3]
    torch.testing.assert_close(objective(**inputs)[0], expected)


def test_fit_saves_best_checkpoint_that_reloads(tiny_encoder, prepared, tmp_path):
    silos = load_dataset(prepared)
    catalog = silos["uk"].catalog
    config = FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), "train.epochs": 2,
                                     "train.batch_size": 16})
    torch.manual_seed(0)
    teacher = Teacher(config.model, catalog)
    result = fit(teacher, silos, config, tmp_path / "ckpt")
    assert len(result.history) == 2 and (tmp_path / "ckpt" / "history.json").is_file()
    reloaded = Teacher.load(tmp_path / "ckpt", catalog)
    for name, value in teacher.adapter_state().items():
        np.testing.assert_array_equal(reloaded.adapter_state()[name], value)
    val = evaluate_ranker(TeacherRanker(reloaded), silos, "val")
    assert val["overall"]["ndcg@10"] == pytest.approx(result.best_val_ndcg, abs=1e-12)
    other = Catalog(catalog.item_ids[:-1], catalog.titles[:-1], catalog.categories[:-1])
    with pytest.raises(FedrecError, match="another catalog"):
        Teacher.load(tmp_path / "ckpt", other)


def test_a_query_for_an_items_own_title_finds_that_item(tiny_encoder, prepared):
    """Search shares the recommendation space: a query is a one-item history made of its text."""
    catalog = Catalog.load(prepared / "catalog.parquet")
    teacher = tiny_teacher(tiny_encoder, catalog)
    rng = np.random.default_rng(0)
    picked = rng.choice(len(catalog), 50, replace=False)
    users = teacher.encode_queries([catalog.texts()[i] for i in picked])
    scores = users @ teacher.item_matrix().T
    top = scores.topk(10).indices.numpy()
    assert np.mean([i in row for i, row in zip(picked, top)]) >= 0.8


def test_loading_the_encoder_draws_no_transformers_bar_and_restores_its_setting(tiny_encoder, capfd):
    for enabled in (True, False):
        (transformers.utils.logging.enable_progress_bar if enabled else transformers.utils.logging.disable_progress_bar)()
        FrozenEncoder(str(tiny_encoder), 16, 8)
        assert "Loading weights" not in capfd.readouterr().err
        assert transformers.utils.logging.is_progress_bar_enabled() == enabled
    transformers.utils.logging.enable_progress_bar()
