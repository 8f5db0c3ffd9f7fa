"""Search logs: the reader, `data prepare --queries`, the search objective (graded targets, the
serving path, per-user independence under DP) and training where no one has validation data."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedrec.config import FedrecConfig
from fedrec.data.prepare import prepare
from fedrec.data.silo import SESSION_PREFIX, Silo, UserRecord, load_dataset, load_silo
from fedrec.errors import DataError, FedrecError
from fedrec.model.teacher import Teacher
from fedrec.privacy.dp_sgd import per_user_gradients, train_private
from fedrec.privacy.plan import DPPlan
from fedrec.tools.cli import app
from fedrec.training.objective import (Example, RetrievalObjective, batch_inputs, can_train, prediction_points,
                                       query_vectors)
from fedrec.training.trainer import fit


@pytest.fixture(scope="module")
def catalog_frame(prepared) -> pd.DataFrame:
    return pd.read_parquet(prepared / "catalog.parquet")


def write_log(path, rows: dict) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def uk_user_ids(prepared) -> list[str]:
    return sorted(pd.read_parquet(prepared / "uk" / "interactions.parquet")["user_id"].unique())


def config_for(tiny_encoder, **settings) -> FedrecConfig:
    return FedrecConfig.from_flat({"model.encoder": str(tiny_encoder), "train.batch_size": 16, **settings})


# -- the reader and prepare -----------------------------------------------------------------------
def test_prepare_writes_a_search_log_into_the_regions_silo(retail_slice, prepared, catalog_frame, tmp_path):
    ids = catalog_frame["item_id"].tolist()
    buyer = uk_user_ids(prepared)[0]
    log = write_log(tmp_path / "uk.csv", {
        "query": ["red mug", "red mug", "Red  Mug", "lamp", "lamp"],
        "item_id": [ids[0], ids[1], ids[0], ids[2], ids[2]],
        "relevance": [3, 0, 1, 1, 2],
        "user_id": [buyer, buyer, "searcher-1", "searcher-1", "searcher-1"],
        "timestamp": ["2011-01-01T10:00:00", "2011-01-01T10:00:00", "2011-02-01T10:00:00", "2011-03-01",
                      "2011-03-02"],
    })
    only_search = write_log(tmp_path / "search.csv", {"query": ["lamp", "LAMP", "clock"],
                                                      "item_id": [ids[2], ids[3], ids[4]]})
    result = prepare(retail_slice, tmp_path / "out", queries={"UK": log, "search": only_search})

    uk = result.summary["queries"]["uk"]
    assert (uk["rows_read"], uk["repeated_rows_merged"], uk["queries"], uk["judged_not_relevant"]) == (5, 1, 3, 1)
    assert uk["privacy_units"] == 2 and uk["users_with_baskets_too"] == 1 and "user_id" in uk["privacy_unit"]
    search = result.summary["queries"]["search"]
    assert search["privacy_units"] == 2 and "query session" in search["privacy_unit"]

    silos = load_dataset(tmp_path / "out")
    assert sorted(silos) == ["eu", "row", "search", "uk"]
    users = {u.user_id: u for u in silos["uk"].users}
    assert users[buyer].baskets and users[buyer].searches, "the searcher who bought is one record with both"
    (mug,) = users[buyer].searches
    assert mug.query == "red mug" and mug.items.tolist() == [0] and mug.gains.tolist() == [3.0]
    lamp = {s.query: s for s in users["searcher-1"].searches}["lamp"]
    assert lamp.items.tolist() == [2] and lamp.gains.tolist() == [2.0], "a repeated pair keeps its highest grade"
    assert users["searcher-1"].baskets == [] and can_train(users["searcher-1"])
    sessions = {u.user_id: u for u in silos["search"].users}
    assert sorted(sessions) == [f"{SESSION_PREFIX}clock", f"{SESSION_PREFIX}lamp"]
    assert sorted(s.query for s in sessions[f"{SESSION_PREFIX}lamp"].searches) == ["LAMP", "lamp"]
    assert all(s.gains.tolist() == [1.0] for u in sessions.values() for s in u.searches), "no relevance: implicit 1"


@pytest.mark.parametrize("rows, row, column, words", [
    ({"item_id": ["{0}"]}, None, "query", "missing column(s) query"),
    ({"query": ["mug", " "], "item_id": ["{0}", "{0}"]}, 2, "query", "empty value"),
    ({"query": ["mug", "lamp"], "item_id": ["{0}", "NOPE"]}, 2, "item_id", "'NOPE' is not in the catalog"),
    ({"query": ["mug", "lamp"], "item_id": ["{0}", ""]}, 2, "item_id", "empty value"),
    ({"query": ["mug"], "item_id": ["{0}"], "relevance": ["high"]}, 1, "relevance", "not a number"),
    ({"query": ["mug", "a"], "item_id": ["{0}", "{0}"], "relevance": ["1", "1.5"]}, 2, "relevance", "not a whole number"),
    ({"query": ["mug", "a"], "item_id": ["{0}", "{0}"], "relevance": ["2", "-1"]}, 2, "relevance", "negative relevance"),
    ({"query": ["mug", "a"], "item_id": ["{0}", "{0}"], "user_id": ["u", ""]}, 2, "user_id", "empty value"),
    ({"query": ["mug"], "item_id": ["{0}"], "timestamp": ["yesterday"]}, 1, "timestamp", "not a timestamp"),
])
def test_a_bad_search_log_is_refused_with_its_row_and_column_and_nothing_is_replaced(
        retail_slice, catalog_frame, tmp_path, rows, row, column, words):
    first = catalog_frame["item_id"].iloc[0]
    log = write_log(tmp_path / "bad.csv", {k: [v.format(first) for v in values] for k, values in rows.items()})
    out = tmp_path / "out"
    prepare(retail_slice, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError) as caught:
        prepare(retail_slice, out, queries={"uk": log})
    error = caught.value
    assert (error.file, error.row, error.column) == (log, row, column) and words in str(error)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_prepare_takes_one_search_log_per_region_and_says_the_unit_of_privacy(retail_slice, catalog_frame,
                                                                                  tmp_path):
    log = write_log(tmp_path / "q.csv", {"query": ["mug"], "item_id": [catalog_frame["item_id"].iloc[0]]})
    result = CliRunner().invoke(app, ["data", "prepare", str(retail_slice), "--out", str(tmp_path / "out"),
                                      "--queries", f"EU={log}"])
    assert result.exit_code == 0, result.output
    assert "search log eu: 1 queries from 1 rows; unit of privacy: a query session" in result.output
    assert (tmp_path / "out" / "eu" / "queries.parquet").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["queries"]["eu"]["privacy_units"] == 1
    for spec, words in ((log, "expected REGION=FILE"), ("../x=" + log, "--queries: '../x' is not a region name")):
        result = CliRunner().invoke(app, ["data", "prepare", str(retail_slice), "--out", str(tmp_path / "o2"),
                                          "--queries", spec])
        assert isinstance(result.exception, FedrecError) and words in str(result.exception), result.output
    result = CliRunner().invoke(app, ["data", "prepare", str(retail_slice), "--out", str(tmp_path / "o2"),
                                      "--queries", f"eu={log}", "--queries", f"EU={log}"])
    assert isinstance(result.exception, FedrecError) and "region eu is given twice" in str(result.exception)
    assert not (tmp_path / "o2").exists()


# -- the objective --------------------------------------------------------------------------------
def search_objective(tiny_encoder, prepared, behaviour=0.1):
    silos = load_dataset(prepared)
    torch.manual_seed(0)
    config = config_for(tiny_encoder, **{"model.search_behaviour": behaviour}).model
    teacher = Teacher(config, silos["uk"].catalog)
    with torch.no_grad():        # non-zero item vectors and biases, so every tensor matters
        teacher.tower.item_vectors.add_(0.1 * torch.randn_like(teacher.tower.item_vectors))
        teacher.tower.item_bias.add_(torch.randn_like(teacher.tower.item_bias))
    return teacher, RetrievalObjective(teacher.tower)


def search_example(teacher, query: str, targets, gains=None) -> Example:
    vector = teacher.text_vectors(teacher.encoder.encode_queries([query])).numpy()[0]
    empty = np.zeros(0, dtype=np.int64)
    return Example(empty, empty, np.array(targets), None if gains is None else np.array(gains, dtype=float), vector)


def basket_example(history, targets) -> Example:
    return Example(np.array(history), np.zeros(len(history), dtype=np.int64), np.array(targets))


def test_a_search_is_trained_as_search_serves_it_with_graded_targets(tiny_encoder, prepared):
    teacher, objective = search_objective(tiny_encoder, prepared)
    rng = np.random.default_rng(0)
    examples = [search_example(teacher, "white hanging heart", [3, 5], [3, 1]), basket_example([1, 2], [4])]
    losses = objective(**batch_inputs(examples, 50, 64, rng))
    # the search row's loss: the weighted cross-entropy of the scores `fedrec search` ranks by
    served = (teacher.encode_queries(["white hanging heart"]) @ teacher.item_matrix().T)[0]
    log_probs = torch.log_softmax(served, 0)
    torch.testing.assert_close(losses[0], -(3 * log_probs[3] + log_probs[5]) / 4, atol=1e-4, rtol=1e-4)
    # the basket row is untouched by a search beside it
    alone = objective(**batch_inputs([examples[1]], 50, 64, rng))
    torch.testing.assert_close(losses[1], alone[0], atol=1e-5, rtol=1e-5)
    flipped = objective(**batch_inputs([search_example(teacher, "white hanging heart", [3, 5], [1, 3])], 50, 64, rng))
    assert abs(flipped[0].item() - losses[0].item()) > 1e-3, "the grades weigh the targets"


def flat(grads: dict, row: int) -> torch.Tensor:
    return torch.cat([g[row].flatten() for g in grads.values()])


def test_changing_one_users_search_changes_only_that_users_per_sample_gradient(tiny_encoder, prepared):
    teacher, objective = search_objective(tiny_encoder, prepared)
    rng = np.random.default_rng(0)
    examples = [search_example(teacher, "red retrospot", [4], [2]), basket_example([5, 6], [7, 8]),
                search_example(teacher, "lunch bag", [10, 11]), basket_example([11], [12])]
    for changed_row, replacement in ((2, search_example(teacher, "vintage doily", [20, 21, 22], [1, 2, 3])),
                                     (1, search_example(teacher, "cake stand", [30]))):
        changed = list(examples)
        changed[changed_row] = replacement
        before = per_user_gradients(objective, batch_inputs(examples, 50, 64, rng))
        after = per_user_gradients(objective, batch_inputs(changed, 50, 64, rng))
        for row in set(range(4)) - {changed_row}:
            torch.testing.assert_close(flat(before, row), flat(after, row), atol=1e-6, rtol=1e-5)
        assert (flat(before, changed_row) - flat(after, changed_row)).norm() > 1e-4
    # each row's gradient is plain autograd on that user's example alone
    params = list(objective.parameters())
    for row, example in enumerate(examples):
        alone = torch.autograd.grad(objective(**batch_inputs([example], 50, 64, rng))[0], params)
        torch.testing.assert_close(flat(before, row), torch.cat([g.flatten() for g in alone]), atol=3e-5, rtol=1e-3)


def searchers(catalog_frame, tmp_path, retail_slice) -> dict[str, Silo]:
    """A query-only region 'search' (sessions: each query string its own privacy unit) whose log
    asks for items by their own title words."""
    titles = catalog_frame["title"].str.lower().tolist()
    chosen = range(0, 120, 2)
    log = write_log(tmp_path / "search.csv", {"query": [" ".join(titles[i].split()[:2]) + f" {i}" for i in chosen],
                                              "item_id": [catalog_frame["item_id"].iloc[i] for i in chosen]})
    prepare(retail_slice, tmp_path / "out", queries={"search": log})
    return load_dataset(tmp_path / "out", ["search"])


def test_a_region_with_only_a_search_log_trains_without_validation_and_learns(
        tiny_encoder, prepared, catalog_frame, retail_slice, tmp_path, caplog, monkeypatch):
    silos = searchers(catalog_frame, tmp_path, retail_slice)
    users = silos["search"].users
    assert len(users) == 60 and not any(u.has_split("val") for u in users)
    config = config_for(tiny_encoder, **{"train.epochs": 3, "train.lr": 0.01})
    torch.manual_seed(0)
    teacher = Teacher(config.model, silos["search"].catalog)

    def target_ranks():
        queries = [s.query for u in users for s in u.searches]
        scores = teacher.encode_queries(queries) @ teacher.item_matrix().T
        targets = torch.as_tensor([s.items[0] for u in users for s in u.searches])
        return (scores > scores.gather(1, targets[:, None])).sum(1).float()

    before = target_ranks()
    monkeypatch.setattr(logging.getLogger("fedrec"), "propagate", True)    # the CLI, run in this process, turns it off
    with caplog.at_level(logging.INFO, logger="fedrec"):
        result = fit(teacher, silos, config, tmp_path / "ckpt")
    assert result.best_epoch == 3 and np.isnan(result.best_val_ndcg)
    said = [r.getMessage() for r in caplog.records if r.name == "fedrec.training.trainer"]
    assert said[0].startswith("training on ") and "no validation users" in said[0]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert target_ranks().mean() < 0.5 * before.mean(), "training on the log brings its items up"
    reloaded = Teacher.load(tmp_path / "ckpt", silos["search"].catalog)
    torch.testing.assert_close(reloaded.tower.item_bias, teacher.tower.item_bias)
    assert json.loads((tmp_path / "ckpt" / "history.json").read_text())["best_epoch"] == 3


def test_training_where_every_user_has_one_basket_keeps_the_last_epoch(tiny_encoder, prepared, tmp_path):
    """The crash of issue 15: no validation users used to end in a TypeError after training."""
    silo = load_silo(prepared / "uk")
    single = [UserRecord(u.user_id, u.baskets[:1], u.queries[:1], 1) for u in silo.users if len(u.baskets[0]) >= 2]
    silos = {"uk": Silo("uk", silo.catalog, single)}
    config = config_for(tiny_encoder, **{"train.epochs": 2})
    teacher = Teacher(config.model, silo.catalog)
    result = fit(teacher, silos, config, tmp_path / "ckpt")
    assert result.best_epoch == 2 and (tmp_path / "ckpt" / "tower.safetensors").is_file()
    nobody = {"uk": Silo("uk", silo.catalog, [UserRecord("u", [np.array([1])], [""], 1)])}
    with pytest.raises(FedrecError, match="has anything to train on"):
        fit(teacher, nobody, config)


def test_cli_train_on_a_search_log_alone_says_there_was_no_validation(
        tiny_encoder, prepared, catalog_frame, retail_slice, tmp_path):
    searchers(catalog_frame, tmp_path, retail_slice)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "out"), "--regions", "search",
                                      "--encoder", str(tiny_encoder), "--out", str(tmp_path / "ckpt"),
                                      "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "best epoch 1: no validation users; saved" in result.output


def test_dp_sgd_trains_on_searches_with_real_opacus(tiny_encoder, prepared, catalog_frame, retail_slice, tmp_path):
    silos = searchers(catalog_frame, tmp_path, retail_slice)
    users = [u for u in silos["search"].users if can_train(u)]
    assert all(prediction_points(u) == [("search", 0)] for u in users)
    config = config_for(tiny_encoder)
    teacher = Teacher(config.model, silos["search"].catalog)
    queries = query_vectors(teacher, users)
    assert sorted(queries) == sorted(s.query for u in users for s in u.searches)
    before = teacher.adapter_state()
    train_private(RetrievalObjective(teacher.tower), users, config.train,
                  DPPlan(len(users), 0.25, 3, noise_multiplier=1.0, max_grad_norm=1.0), queries=queries)
    after = teacher.adapter_state()
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.allclose(before[k], after[k]) for k in before)
