"""Search: the bundle's BM25 index against bm25s, the fusions, graded metrics, the judgments
reader and `fedrec search-eval` end to end, on a tiny bundle over the real catalog slice."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading

import bm25s
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrec.data.silo import Catalog
from fedrec.edge_runtime import BundleError, EdgeModel
from fedrec.edge_runtime.bundle import MANIFEST, digest_line
from fedrec.edge_runtime.fusion import Fusion
from fedrec.edge_runtime.server import make_server
from fedrec.errors import DataError
from fedrec.evaluation.metrics import graded_metrics
from fedrec.export.bundle import export_bundle
from fedrec.tools.cli import app
from fedrec.tools.search_eval import read_judgments, search_eval

from test_edge import post


@pytest.fixture(scope="module")
def catalog(prepared):
    return Catalog.load(prepared / "catalog.parquet")


@pytest.fixture(scope="module")
def bundle(tiny_teacher, catalog, tmp_path_factory):
    return export_bundle(tiny_teacher, catalog, tmp_path_factory.mktemp("search") / "bundle", int8=False,
                         fusion=Fusion("convex", 0.5))


@pytest.fixture(scope="module")
def model(bundle):
    return EdgeModel(bundle, "fp32")


def titled_queries(catalog) -> list[str]:
    """Words of real titles, mixed case, repeated, with stopwords, unknown words and punctuation."""
    rng = np.random.default_rng(3)
    picked = [catalog.titles[i] for i in rng.choice(len(catalog), 30, replace=False)]
    return picked + [" ".join(t.split()[:2]).lower() for t in picked] + [
        "Heart heart HEART", "the of and", "zzzqx mug", "t-light, holder!", "RED retrospot & white"]


def test_edge_bm25_scores_equal_bm25s(model, catalog):
    """The index bm25s builds with its defaults, queried the bm25s way, scores every item as the
    edge does with numpy alone: the same tokenisation and the same weights."""
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(catalog.texts(), stopwords="en", show_progress=False), show_progress=False)
    queries = titled_queries(catalog)
    edge = model.lexical.scores(queries)
    compared = 0
    for query, got in zip(queries, edge):
        words = [w for w in bm25s.tokenize(query, stopwords="en", return_ids=False, show_progress=False)[0]
                 if w in reference.vocab_dict]
        if words:
            np.testing.assert_allclose(got, reference.get_scores(words), rtol=1e-6, atol=1e-7)
            compared += 1
        else:
            assert not got.any(), query          # nothing to match: no item scores
    assert compared >= 60 and edge.max() > 0
    assert model.lexical.scores(["the of and"]).max() == 0        # stopwords only


def test_search_modes_rank_their_own_scores(model, catalog):
    title = next(t for t in catalog.titles if len(t.split()) >= 4)
    lexical = model.search(title, 5, mode="lexical")
    assert lexical[0].title == title or set(lexical[0].title.lower().split()) >= set(title.lower().split())
    queries = ["red mug", title.lower(), "christmas"]
    dense = model.dense_scores(queries)
    for mode, expected in (("dense", dense), ("lexical", model.lexical.scores(queries)),
                           ("hybrid", Fusion("convex", 0.5).scores(dense, model.lexical.scores(queries)))):
        np.testing.assert_allclose(model.search_scores(queries, mode), expected, rtol=1e-6)
        for query, results, scores in zip(queries, model.search_batch(queries, 5, mode), expected):
            assert [r.score for r in results] == pytest.approx(np.sort(scores)[::-1][:5], rel=1e-5)
            assert [r.item_id for r in results] == [r.item_id for r in model.search(query, 5, mode)]
    assert [r.item_id for r in model.search("red mug", 5)] == [r.item_id for r in model.search("red mug", 5, "hybrid")]
    with pytest.raises(ValueError, match="unknown search mode 'fuzzy'"):
        model.search("red mug", 5, mode="fuzzy")


def test_fusions_by_hand():
    dense = np.array([[4.0, 2.0, 0.0, 3.0]])
    lexical = np.array([[0.0, 5.0, 10.0, 0.0]])
    np.testing.assert_allclose(Fusion("convex", 0.25).scores(dense, lexical),
                               [[0.75 * 1, 0.75 * 0.5 + 0.25 * 0.5, 0.25 * 1, 0.75 * 0.75]])
    # dense ranks 1, 3, 4, 2; lexical ranks 3, 2, 1 for the items it matches (items 0 and 3 get no term)
    np.testing.assert_allclose(Fusion("rrf", 10).scores(dense, lexical),
                               [[1 / 11, 1 / 13 + 1 / 12, 1 / 14 + 1 / 11, 1 / 12]])
    assert not Fusion("convex", 0.5).scores(np.ones((1, 3)), np.zeros((1, 3))).any()      # flat rows → 0
    assert Fusion.parse("rrf:60") == Fusion("rrf", 60.0) and str(Fusion("convex", 0.3)) == "convex:0.3"
    for bad in ("convex:1.5", "rrf:0", "bm25:1", "convex", "rrf:x"):
        with pytest.raises(ValueError):
            Fusion.parse(bad)


def test_graded_metrics_by_hand():
    ranked = np.array([5, 2, 7, 1, 9, 3])
    items, relevance = np.array([2, 7, 1, 9]), np.array([3, 0, 1, 2])
    got = graded_metrics(ranked, items, relevance, k=3)
    dcg = (2 ** 3 - 1) / math.log2(3)                                   # item 2 at rank 2
    ideal = (2 ** 3 - 1) / 1 + (2 ** 2 - 1) / math.log2(3) + (2 ** 1 - 1) / 2
    assert got == pytest.approx({"ndcg@3": dcg / ideal, "recall@3": 1 / 3, "mrr": 1 / 2})
    assert graded_metrics(np.array([2, 9, 1]), items, relevance, k=3) == pytest.approx(
        {"ndcg@3": ((2 ** 3 - 1) + (2 ** 2 - 1) / math.log2(3) + 1 / 2) / ideal, "recall@3": 1.0, "mrr": 1.0})
    assert graded_metrics(np.array([5, 7]), items, relevance, k=3)["mrr"] == 0


def write(tmp_path, rows, name="judged.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("rows, where, message", [
    ([{"query": "mug", "item_id": "A"}], "column 'relevance'", "missing column"),
    ([{"query": "mug", "item_id": "A", "relevance": 1}, {"query": " ", "item_id": "A", "relevance": 1}],
     "row 2, column 'query'", "empty value"),
    ([{"query": "mug", "item_id": "A", "relevance": "1.5"}], "row 1, column 'relevance'", "not a whole number"),
    ([{"query": "mug", "item_id": "A", "relevance": "high"}], "row 1, column 'relevance'", "not a number"),
    ([{"query": "mug", "item_id": "A", "relevance": 1}, {"query": "mug", "item_id": "B", "relevance": -1}],
     "row 2, column 'relevance'", "negative relevance"),
    ([{"query": "mug", "item_id": "A", "relevance": 1}, {"query": "mug", "item_id": "A", "relevance": 2}],
     "row 2, column 'item_id'", "judged in an earlier row"),
    ([{"query": "mug", "item_id": "NOPE", "relevance": 1}], "column 'item_id'", "none of the 1 judged item ids"),
    ([{"query": "mug", "item_id": "A", "relevance": 0}], "column 'relevance'", "no query has a relevant"),
])
def test_judgments_reader_locates_bad_input(tmp_path, rows, where, message):
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as error:
        read_judgments(path, {"A": 0, "B": 1})
    assert f"file {path}" in str(error.value) and where in str(error.value) and message in str(error.value)


def test_judgments_reader_skips_and_counts_unknown_items(tmp_path):
    path = write(tmp_path, [{"query": "mug", "item_id": "A", "relevance": 2},
                            {"query": "mug", "item_id": "GONE", "relevance": 3},
                            {"query": "mug", "item_id": "B", "relevance": 0},
                            {"query": "bag", "item_id": "GONE", "relevance": 1},
                            {"query": "tin", "item_id": "B", "relevance": 0}], "judged.parquet")
    pd.read_csv(path).to_parquet(path)
    judged = read_judgments(path, {"A": 0, "B": 1})
    assert judged.queries == ["mug"] and judged.items[0].tolist() == [0, 1] and judged.relevance[0].tolist() == [2, 0]
    assert (judged.rows, judged.unknown_rows, judged.unknown_ids) == (5, 2, ["GONE"])
    assert judged.without_relevant == ["bag", "tin"]


def judgments_of(catalog, count=12):
    """Each query a real title's first two words: its item 2, items holding both words 1, two others 0."""
    rows = []
    for i in range(0, 10 * count, 10):
        query = " ".join(catalog.titles[i].split()[:2]).lower()
        rows.append({"query": query, "item_id": catalog.item_ids[i], "relevance": 2})
        rows += [{"query": query, "item_id": catalog.item_ids[j], "relevance": 1} for j, t in enumerate(catalog.titles)
                 if j != i and set(query.split()) <= set(t.lower().split())][:5]
        rows += [{"query": query, "item_id": catalog.item_ids[j], "relevance": 0} for j in (i + 3, i + 5)]
    return pd.DataFrame(rows).drop_duplicates(["query", "item_id"])


def test_search_eval_measures_each_mode_and_view(model, catalog, tmp_path):
    path = tmp_path / "judged.csv"
    judgments_of(catalog).to_csv(path, index=False)
    judged = read_judgments(path, model.position)
    report = search_eval(model, judged, k=10, progress=False)
    assert report["queries"] == len(judged.queries) == len(report["per_query"])
    for view in ("full_catalog", "rerank_judged"):
        for mode in ("dense", "lexical", "hybrid"):
            values = report[view][mode]
            assert set(values) == {"ndcg@10", "recall@10", "mrr"} and all(0 <= v <= 1 for v in values.values())
            assert values["ndcg@10"] == pytest.approx(np.mean([q[view][mode]["ndcg@10"] for q in report["per_query"]]))
    first = report["per_query"][0]                  # recomputed by hand: its full-catalog lexical ranking
    scores = model.lexical.scores([first["query"]])[0]
    ranked = np.lexsort((np.arange(len(scores)), -scores))
    assert first["full_catalog"]["lexical"] == pytest.approx(
        graded_metrics(ranked, judged.items[0], judged.relevance[0], 10))
    assert report["full_catalog"]["lexical"]["mrr"] > 0.5       # the queries are words of their items' titles
    tuned = search_eval(model, judged, k=10, tune_share=0.5, progress=False)
    assert 0 < tuned["tuning"]["queries"] < len(judged.queries) and tuned["queries"] == len(judged.queries) - tuned["tuning"]["queries"]
    assert tuned["tuning"]["best"] in tuned["tuning"]["ndcg@10"] and len(tuned["tuning"]["ndcg@10"]) == 15


def fedrec(*args):
    return subprocess.run([sys.executable, "-m", "fedrec.tools", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_search_eval_cli_end_to_end(bundle, catalog, tmp_path):
    """As a user runs it, in a process of its own: the report, the JSON, and a located error."""
    frame = judgments_of(catalog)
    frame.loc[len(frame)] = {"query": frame["query"].iloc[0], "item_id": "NOPE", "relevance": 1}
    frame.to_csv(tmp_path / "judged.csv", index=False)
    result = fedrec("search-eval", bundle, "--judgments", tmp_path / "judged.csv", "--json", tmp_path / "out.json",
                    "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 of" in result.stderr and "NOPE" in result.stderr and "search-eval" in result.stderr   # the bar
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith(("full_catalog", "rerank_judged"))]
    assert sorted((view, mode) for view, mode, *_ in lines) == sorted(
        (view, mode) for view in ("full_catalog", "rerank_judged") for mode in ("dense", "hybrid", "lexical"))
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["skipped"]["unknown_item_ids"] == ["NOPE"] and report["fusion"] == "convex:0.5"
    assert len(report["per_query"]) == report["queries"] == frame["query"].nunique()
    hybrid = next(line for line in lines if line[:2] == ["full_catalog", "hybrid"])
    assert float(hybrid[3]) == pytest.approx(report["full_catalog"]["hybrid"]["ndcg@10"], abs=1e-4)

    frame.loc[len(frame)] = {"query": "mug", "item_id": catalog.item_ids[0], "relevance": "two"}
    frame.to_csv(tmp_path / "bad.csv", index=False)
    result = fedrec("search-eval", bundle, "--judgments", tmp_path / "bad.csv", "--json", tmp_path / "bad.json",
                    "--precision", "fp32")
    assert result.returncode == 2 and not (tmp_path / "bad.json").exists()
    assert f"row {len(frame)}, column 'relevance': not a number: 'two'" in result.stderr and "Traceback" not in result.stderr


def test_search_cli_modes(bundle, catalog):
    title = catalog.titles[0]
    lexical = CliRunner().invoke(app, ["search", str(bundle), title, "--mode", "lexical", "--k", "3", "--precision", "fp32"])
    assert lexical.exit_code == 0 and len(lexical.stdout.splitlines()) == 3
    assert set(title.split()) <= set(lexical.stdout.splitlines()[0].split())
    hybrid = CliRunner().invoke(app, ["search", str(bundle), title, "--k", "3", "--precision", "fp32"])
    assert hybrid.exit_code == 0 and len(hybrid.stdout.splitlines()) == 3
    bad = CliRunner().invoke(app, ["search", str(bundle), title, "--mode", "fuzzy", "--precision", "fp32"])
    assert "--mode 'fuzzy': choose hybrid, dense, lexical" in str(bad.exception)


def test_http_search_takes_a_mode(model, catalog):
    server = make_server(model, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    title = catalog.titles[0]
    try:
        for mode in ("hybrid", "dense", "lexical"):
            status, body = post(base, "/search", {"query": title, "k": 4, "mode": mode})
            assert status == 200 and [r["item_id"] for r in body["results"]] == \
                [r.item_id for r in model.search(title, 4, mode)]
        assert post(base, "/search", {"query": title})[1]["results"][0]["item_id"] == model.search(title, 1)[0].item_id
        status, body = post(base, "/search", {"query": title, "mode": "fuzzy"})
        assert status == 400 and body["error"] == "mode must be one of hybrid, dense, lexical"
        assert post(base, "/search", {"query": title, "mode": 3})[0] == 400
    finally:
        server.shutdown()
        server.server_close()


def rewrite_manifest(folder, change):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / "manifest.sha256").write_bytes(digest_line((folder / MANIFEST).read_bytes()))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=3), "format version 3, this runtime reads 4; export the bundle again"),
    (lambda m: m["model"].pop("lexical"), "model.lexical is missing"),
    (lambda m: m["model"]["fusion"].update(method="max"), "unknown fusion 'max'"),
    (lambda m: m["model"]["fusion"].update(parameter="0.5"), "model.fusion.parameter must be a number"),
    (lambda m: m["model"]["lexical"].update(data="elsewhere.npy"), "must be a file of this bundle"),
])
def test_bundles_without_a_good_lexical_index_are_refused(bundle, tmp_path, change, message):
    """Bundles exported before the lexical index (format 3) are refused by their version."""
    copy = shutil.copytree(bundle, tmp_path / "copy")
    rewrite_manifest(copy, change)
    with pytest.raises(BundleError, match=message):
        EdgeModel(copy, "fp32")


def test_lexical_files_are_listed_and_checked(bundle, tmp_path):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert set(manifest["model"]["lexical"].values()) <= set(manifest["files"])
    assert manifest["model"]["fusion"] == {"method": "convex", "parameter": 0.5}
    copy = shutil.copytree(bundle, tmp_path / "copy")
    data = bytearray((copy / "lexical.data.npy").read_bytes())
    data[-1] ^= 1
    (copy / "lexical.data.npy").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="lexical.data.npy does not match its SHA-256"):
        EdgeModel(copy, "fp32")


def test_export_refuses_a_bad_fusion_before_it_starts(tiny_teacher, prepared, tmp_path):
    result = CliRunner().invoke(app, ["export", str(tiny_teacher), "--out", str(tmp_path / "b"), "--data", str(prepared),
                                      "--fusion", "convex:1.5"])
    assert "--fusion: fusion 'convex:1.5': a convex fusion's lexical weight must be in [0, 1]" in str(result.exception)
    assert not (tmp_path / "b").exists()
