"""Ingestion of real Online Retail rows: cleaning, region mapping, basket split, the public
catalog, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.atomic import OUTPUT_MARKER, atomic_dir
from fedrec.data.prepare import prepare
from fedrec.data.regions import RegionMap
from fedrec.data.silo import load_dataset
from fedrec.data.sources import PRODUCT_CODE
from fedrec.errors import DataError, FedrecError


def test_row_counts_and_cleaning_rules(retail_slice, prepared):
    raw = pd.read_csv(retail_slice, dtype=str, keep_default_na=False)
    summary = pd.read_json(prepared / "summary.json", typ="series")
    cleaning = summary["cleaning"]
    assert cleaning["rows_read"] == len(raw)
    assert cleaning["dropped_no_customer"] == (raw["CustomerID"] == "").sum() == 50
    known = raw[raw["CustomerID"] != ""]
    assert cleaning["dropped_cancellation"] == known["InvoiceNo"].str.startswith("C").sum()
    kept = (known[~known["InvoiceNo"].str.startswith("C")
                  & known["StockCode"].str.upper().str.match(PRODUCT_CODE)]
            .astype({"Quantity": int, "UnitPrice": float}))
    kept = kept[(kept["Quantity"] > 0) & (kept["UnitPrice"] > 0)]
    assert cleaning["rows_kept"] == len(kept)

    catalog = pd.read_parquet(prepared / "catalog.parquet")
    assert catalog["item_id"].is_unique
    listed = raw["StockCode"].str.upper()
    assert set(catalog["item_id"]) == set(listed[listed.str.match(PRODUCT_CODE)]), \
        "the catalog lists every product in the file, not only those bought"
    assert set(kept["StockCode"].str.upper()) < set(catalog["item_id"])


def test_online_retail_catalog_lists_products_sold_only_to_unknown_customers(retail_slice, prepared):
    raw = pd.read_csv(retail_slice, dtype=str, keep_default_na=False)
    rows = raw.assign(item_id=raw["StockCode"].str.upper(), Description=raw["Description"].str.strip())
    rows = rows[rows["item_id"].str.match(PRODUCT_CODE)].groupby("item_id")
    has_customer = rows["CustomerID"].agg(lambda ids: (ids != "").any())
    anonymous_only = set(has_customer.index[~has_customer])
    assert anonymous_only, "the slice holds products that only customers without an id bought"
    catalog = pd.read_parquet(prepared / "catalog.parquet").set_index("item_id")
    assert anonymous_only <= set(catalog.index)
    descriptions = rows["Description"].agg(set)
    assert all(catalog.loc[item, "title"] in descriptions[item] for item in anonymous_only)
    bought = set(pd.concat(map(pd.read_parquet, prepared.glob("*/interactions.parquet")))["item_id"])
    assert not anonymous_only & bought
    summary = pd.read_json(prepared / "summary.json", typ="series")
    assert summary["catalog_items"] == len(catalog)
    assert summary["catalog_items_without_interactions"] == len(set(catalog.index) - bought)


def test_region_mapping(retail_slice, prepared):
    raw = pd.read_csv(retail_slice, dtype=str, keep_default_na=False)
    country = raw[raw["CustomerID"] != ""].assign(
        user=lambda f: f["CustomerID"].str.replace(".0", "", regex=False)).groupby("user")["Country"].first()
    expected = {"United Kingdom": "uk", "Germany": "eu", "France": "eu", "EIRE": "eu",
                "Channel Islands": "eu", "Australia": "row", "Japan": "row"}
    regions = sorted(p.name for p in prepared.iterdir() if p.is_dir() and p.name != OUTPUT_MARKER)
    assert regions == ["eu", "row", "uk"]
    for region in regions:
        users = pd.read_parquet(prepared / region / "interactions.parquet")["user_id"].unique()
        assert {expected[country[u]] for u in users} == {region}
    mapping = RegionMap.standard()
    assert mapping("Switzerland") == "eu" and mapping("Brazil") == "row" and mapping("United Kingdom") == "uk"


def test_basket_split_invariants(prepared):
    for region in ("uk", "eu", "row"):
        frame = pd.read_parquet(prepared / region / "interactions.parquet")
        assert not frame.duplicated(["user_id", "item_id"]).any(), "an item bought twice stays once"
        for user, rows in frame.groupby("user_id"):
            # every basket lies in exactly one split and has one timestamp
            per_basket = rows.groupby("basket").agg(splits=("split", "nunique"), times=("timestamp", "nunique"))
            assert (per_basket["splits"] == 1).all() and (per_basket["times"] == 1).all()
            history = rows[rows["split"] == "train"]
            for split in ("val", "test"):
                target = rows[rows["split"] == split]
                if target.empty:
                    continue
                before = rows[rows["basket"] < target["basket"].iloc[0]]
                assert (target["timestamp"] > before["timestamp"].max()).all()
                assert not set(target["item_id"]) & set(before["item_id"])
            n = rows["basket"].max() + 1
            assert (rows["split"] == "test").any() == (n >= 2)
            assert (rows["split"] == "val").any() == (n >= 3)
            assert len(history) > 0


def test_silos_load_as_user_records(prepared):
    silos = load_dataset(prepared)
    frame = pd.read_parquet(prepared / "eu" / "interactions.parquet")
    eu = silos["eu"]
    assert len(eu.users) == frame["user_id"].nunique()
    user = eu.users[0]
    history, ages, query, targets = user.eval_case("test")
    rows = frame[frame["user_id"] == user.user_id]
    assert sorted(eu.catalog.item_ids[i] for i in targets) == sorted(rows[rows["split"] == "test"]["item_id"])
    assert len(history) == (rows["split"] != "test").sum() and query == ""
    # newest basket first, each item carrying its basket's age
    earlier = rows[rows["split"] != "test"]
    newest = earlier["basket"].max()
    assert ages.tolist() == sorted(ages.tolist()) and ages[0] == 0
    assert {eu.catalog.item_ids[i] for i in history[ages == 0]} == set(earlier[earlier["basket"] == newest]["item_id"])


def write_bad(tmp_path, retail_slice, edit):
    frame = pd.read_csv(retail_slice, dtype=str, keep_default_na=False).head(200)
    frame = edit(frame)
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("edit, row, column, words", [
    (lambda f: f.drop(columns=["Country"]), None, "Country", "missing column"),
    (lambda f: f.assign(InvoiceDate=f["InvoiceDate"].where(f.index != 17, "yesterday")), 18, "InvoiceDate", "timestamp"),
    (lambda f: f.assign(Quantity=f["Quantity"].where(f.index != 5, "six")), 6, "Quantity", "not a number"),
    (lambda f: f.assign(Country=f["Country"].where(f.index != 9, "")), 10, "Country", "empty"),
])
def test_bad_input_names_file_row_and_column(tmp_path, retail_slice, edit, row, column, words):
    bad = write_bad(tmp_path, retail_slice, edit)
    out = tmp_path / "out"
    (out / OUTPUT_MARKER).mkdir(parents=True)                 # an earlier fedrec output
    (out / "summary.json").write_text("earlier output")
    with pytest.raises(DataError) as info:
        prepare(bad, out)
    error = info.value
    assert error.file == str(bad) and error.column == column and error.row == row
    assert words in str(error)
    assert folder_bytes(out) == {"summary.json": b"earlier output"}, "earlier output is untouched"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary left"


def test_cli_reports_bad_input_without_traceback(tmp_path, retail_slice):
    bad = write_bad(tmp_path, retail_slice, lambda f: f.drop(columns=["StockCode"]))
    result = subprocess.run([sys.executable, "-m", "fedrec.tools", "data", "prepare", str(bad),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing column(s) StockCode" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_generic_format(tmp_path, suffix):
    interactions = pd.DataFrame({
        "user_id": ["a", "a", "a", "b", "b", "c"],
        "item_id": ["i1", "i2", "i3", "i1", "i4", "i2"],
        "timestamp": ["2024-01-01T10:00:00", "2024-01-01T10:00:00", "2024-02-01T10:00:00",
                      "2024-01-03T09:00:00", "2024-01-05T09:00:00", "2024-01-07T09:00:00"],
        "region": ["eu", "eu", "eu", "uk", "uk", "uk"],
        "query": ["", "", "red mug", "", "lamp", ""],
    })
    catalog = pd.DataFrame({"item_id": ["i1", "i2", "i3", "i4"],
                            "title": ["Blue mug", "Tea towel", "Red mug", "Desk lamp"],
                            "category": ["kitchen", "kitchen", "kitchen", "home"]})
    write = (lambda f, p: f.to_csv(p, index=False)) if suffix == "csv" else (lambda f, p: f.to_parquet(p))
    write(interactions, tmp_path / f"interactions.{suffix}")
    write(catalog, tmp_path / f"catalog.{suffix}")
    result = prepare(tmp_path / f"interactions.{suffix}", tmp_path / "out", catalog=tmp_path / f"catalog.{suffix}")
    assert result.summary["regions"]["eu"]["users_with_test"] == 1
    silos = load_dataset(tmp_path / "out")
    user_a = silos["eu"].users[0]
    assert [sorted(silos["eu"].catalog.item_ids[i] for i in b) for b in user_a.baskets] == [["i1", "i2"], ["i3"]]
    assert user_a.queries == ["", "red mug"]
    assert silos["uk"].catalog.text(3) == "Desk lamp (home)"


def test_generic_catalog_is_kept_whole_and_search_finds_items_nobody_bought(prepared, tiny_encoder, tmp_path):
    """One region's real purchases against the whole listing: items nobody bought stay in the
    catalog, and even an untrained teacher ranks each first for its own title as the query (text
    similarity dominates search). Measured here: rank 1 for all 1018 under 3 encoder × 3 tower
    seeds; only a title that is another's words reordered can come second."""
    import torch

    from fedrec.config import FedrecConfig
    from fedrec.model.teacher import Teacher

    listing = pd.read_parquet(prepared / "catalog.parquet")[["item_id", "title"]]
    listing.to_csv(tmp_path / "catalog.csv", index=False)
    eu = pd.read_parquet(prepared / "eu" / "interactions.parquet").assign(region="eu")
    eu[["user_id", "item_id", "timestamp", "region"]].to_csv(tmp_path / "eu.csv", index=False)
    result = prepare(tmp_path / "eu.csv", tmp_path / "out", catalog=tmp_path / "catalog.csv")

    catalog = load_dataset(tmp_path / "out")["eu"].catalog
    assert sorted(catalog.item_ids) == sorted(listing["item_id"])
    bought = set(eu["item_id"])
    never_bought = [i for i, item in enumerate(catalog.item_ids) if item not in bought]
    assert result.summary["catalog_items_without_interactions"] == len(never_bought) > 0

    torch.manual_seed(0)
    teacher = Teacher(FedrecConfig.from_flat({"model.encoder": str(tiny_encoder)}).model, catalog)
    items = teacher.item_matrix()
    assert len(items) == len(catalog) and torch.isfinite(items).all()
    unique_titles = set(listing["title"].drop_duplicates(keep=False))
    queried = np.array([i for i in never_bought if catalog.titles[i] in unique_titles])
    scores = (teacher.encode_queries([catalog.titles[i] for i in queried]) @ items.T).numpy()
    ranks = (scores > scores[np.arange(len(queried)), queried][:, None]).sum(1) + 1
    assert len(queried) > 500 and (ranks == 1).all(), \
        [(catalog.titles[i], r) for i, r in zip(queried, ranks) if r > 1][:5]


def test_generic_unknown_item_is_refused(tmp_path):
    pd.DataFrame({"user_id": ["a"], "item_id": ["zz"], "timestamp": ["2024-01-01"], "region": ["eu"]}) \
        .to_csv(tmp_path / "i.csv", index=False)
    pd.DataFrame({"item_id": ["i1"], "title": ["Mug"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match="'zz' is not in the catalog") as info:
        prepare(tmp_path / "i.csv", tmp_path / "out", catalog=tmp_path / "c.csv")
    assert info.value.row == 1 and info.value.column == "item_id"


def test_original_xlsx_layout_gives_the_same_silos_as_csv(retail_slice, tmp_path):
    frame = pd.read_csv(retail_slice, dtype=str, keep_default_na=False).head(400)
    frame.to_csv(tmp_path / "slice.csv", index=False)
    typed = frame.assign(InvoiceDate=pd.to_datetime(frame["InvoiceDate"]),      # Excel date cells
                         Quantity=frame["Quantity"].astype(int), UnitPrice=frame["UnitPrice"].astype(float))
    typed.to_excel(tmp_path / "slice.xlsx", index=False)
    from_csv = prepare(tmp_path / "slice.csv", tmp_path / "csv").summary
    from_xlsx = prepare(tmp_path / "slice.xlsx", tmp_path / "xlsx").summary
    assert from_xlsx["regions"] == from_csv["regions"] and from_xlsx["cleaning"] == from_csv["cleaning"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "xlsx" / "uk" / "interactions.parquet"),
                                  pd.read_parquet(tmp_path / "csv" / "uk" / "interactions.parquet"))


def test_prepare_refuses_to_replace_an_output_holding_a_privacy_ledger_or_other_foreign_files(retail_slice, prepared, tmp_path):
    """A region's privacy records live beside its silo by default (OUT/<region>/.fedrec/):
    replacing OUT would erase its ledger and silently reset its privacy budget."""
    out = shutil.copytree(prepared, tmp_path / "out")
    ledger = out / "eu" / ".fedrec" / "ledger.jsonl"
    ledger.parent.mkdir()
    ledger.write_bytes(b'{"index": 0, "region": "eu", "epsilon": 0.8}\n')
    before = folder_bytes(tmp_path)
    with pytest.raises(DataError) as info:
        prepare(retail_slice, out)
    assert info.value.file == str(ledger)
    assert "a region's privacy records" in str(info.value) and f"Move it out of {out}" in str(info.value)
    assert folder_bytes(tmp_path) == before, "nothing written, moved or removed"
    ledger.unlink()
    (out / "notes.txt").write_text("mine")                 # not fedrec output either
    with pytest.raises(DataError, match="did not write") as info:
        prepare(retail_slice, out)
    assert info.value.file == str(out / "notes.txt") and (out / "notes.txt").read_text() == "mine"


def write_generic(folder: Path, regions: list[str] | None = None, timestamps: list[str] | None = None) -> Path:
    """A generic interactions file of three rows, two users (and its catalog beside it), with these
    regions (None: no region column) and timestamps."""
    frame = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["i1", "i2", "i1"],
                          "timestamp": timestamps or ["2024-01-01T10:00:00", "2024-02-01T10:00:00", "2024-01-03T09:00:00"]})
    if regions is not None:
        frame["region"] = regions
    frame.to_csv(folder / "i.csv", index=False)
    pd.DataFrame({"item_id": ["i1", "i2"], "title": ["Mug", "Lamp"]}).to_csv(folder / "c.csv", index=False)
    return folder / "i.csv"


UNSAFE_REGIONS = ["../escaped", "/abs/escaped", ".", "..", "a/b", "catalog.parquet", "summary.json", "x" * 33, "é"]


@pytest.mark.parametrize("name", UNSAFE_REGIONS)
@pytest.mark.parametrize("given_as", ["column", "--region", "region map"])
def test_region_names_that_could_be_paths_are_refused_where_they_enter(tmp_path, retail_slice, name, given_as):
    """A region's name becomes its silo's folder: `../escaped` once wrote a silo outside OUT, and
    `.`, `catalog.parquet` or `summary.json` crashed with a traceback."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = tmp_path / "work" / "out"
    with pytest.raises(DataError, match="not a region name") as info:
        if given_as == "column":
            prepare(write_generic(inputs, ["eu", name, "eu"]), out, catalog=inputs / "c.csv")
        elif given_as == "--region":
            prepare(write_generic(inputs), out, catalog=inputs / "c.csv", default_region=name)
        else:
            (inputs / "map.json").write_text(json.dumps({"default": "row", "countries": {"France": name}}))
            prepare(retail_slice, out, regions=RegionMap.from_file(inputs / "map.json"))
    where = {"column": (str(inputs / "i.csv"), 2, "region"), "--region": (None, None, None),
             "region map": (str(inputs / "map.json"), None, "countries.France")}[given_as]
    assert (info.value.file, info.value.row, info.value.column) == where
    assert "a-z, 0-9" in str(info.value), "the message says which names are allowed"
    assert [p.name for p in tmp_path.iterdir()] == ["in"] and not Path("/abs").exists(), "nothing written"


def test_region_names_are_one_region_whatever_their_case(tmp_path):
    result = prepare(write_generic(tmp_path, ["EU", "eu", " Eu "]), tmp_path / "out", catalog=tmp_path / "c.csv")
    assert list(result.summary["regions"]) == ["eu"]
    assert sorted(load_dataset(tmp_path / "out", ["EU"])) == ["eu"]
    (tmp_path / "map.json").write_text(json.dumps({"default": "ROW", "countries": {"France": "EU"}}))
    mapping = RegionMap.from_file(tmp_path / "map.json")
    assert (mapping("France"), mapping("Peru")) == ("eu", "row")


@pytest.mark.parametrize("document, column", [
    ([1, 2], None), ("eu", None), ({"default": "row"}, "countries"), ({"countries": {}}, "default"),
    ({"default": 5, "countries": {}}, "default"), ({"default": "row", "countries": {"France": None}}, "countries.France"),
])
def test_region_maps_of_the_wrong_shape_are_refused_naming_the_key(tmp_path, document, column):
    (tmp_path / "map.json").write_text(json.dumps(document))
    with pytest.raises(DataError) as info:
        RegionMap.from_file(tmp_path / "map.json")
    assert (info.value.file, info.value.column) == (str(tmp_path / "map.json"), column)


@pytest.mark.parametrize("timestamp", ["-99999999999", "99999999999", "9999-12-31T00:00:00"])
def test_timestamps_beyond_what_a_silo_holds_are_refused_with_their_row(tmp_path, timestamp):
    """Unix −99999999999 (year −1199) once ended in an OutOfBoundsDatetime traceback."""
    numeric = timestamp.lstrip("-").isdigit()
    good = ["1700000000", "1700000100"] if numeric else ["2024-01-01T10:00:00", "2024-02-01T10:00:00"]
    source = write_generic(tmp_path, ["eu"] * 3, [good[0], timestamp, good[1]])
    with pytest.raises(DataError, match="a timestamp outside 1677-09-21 to 2262-04-11") as info:
        prepare(source, tmp_path / "out", catalog=tmp_path / "c.csv")
    assert (info.value.row, info.value.column) == (2, "timestamp")


def test_a_cut_gzip_file_is_a_located_error(tmp_path, retail_slice):
    """A truncated .csv.gz once ended the CLI with nothing but "Aborted." (an EOFError)."""
    whole = gzip.compress(retail_slice.read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cannot parse") as info:
        prepare(tmp_path / "cut.csv.gz", tmp_path / "out")
    assert info.value.file == str(tmp_path / "cut.csv.gz")


def test_output_folders_fedrec_did_not_write_are_never_replaced(tmp_path, retail_slice):
    """Every --out that `atomic_dir` replaces (prepare's, export's bundle) may only be empty or
    fedrec's own: it carries the OUTPUT_MARKER folder, which a bundle's file check ignores."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text("someone's")       # a name prepare writes, but not prepare's file
    with pytest.raises(FedrecError, match="is not a folder fedrec wrote") as info:
        prepare(retail_slice, foreign)
    assert str(foreign) in str(info.value) and "Pass a new or empty output folder" in str(info.value)
    with pytest.raises(FedrecError, match="is not a folder fedrec wrote"):
        with atomic_dir(foreign) as tmp:
            (tmp / "new.txt").write_text("new")
    assert folder_bytes(tmp_path) == {"foreign/summary.json": b"someone's"}, "nothing written or removed"

    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(FedrecError, match="exists and is not a folder"):
        with atomic_dir(tmp_path / "a-file"):
            pass
    (tmp_path / "empty").mkdir()
    for _ in range(2):                                        # an empty folder, then fedrec's own
        with atomic_dir(tmp_path / "empty") as tmp:
            (tmp / "new.txt").write_text("new")
    assert folder_bytes(tmp_path / "empty") == {"new.txt": b"new"} and (tmp_path / "empty" / OUTPUT_MARKER).is_dir()


def test_replacing_an_output_never_leaves_its_path_missing(tmp_path):
    """Two renames (old away, new in) left an instant with no folder at all; renameat2's
    RENAME_EXCHANGE swaps them in one step."""
    out, missing, done = tmp_path / "out", [], threading.Event()

    def watch():
        while not done.is_set():
            if not os.path.isdir(out):
                missing.append(1)

    with atomic_dir(out) as tmp:
        (tmp / "n").write_text("0")
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for n in range(1, 1001):            # before: missing in hundreds of these, in every run
            with atomic_dir(out) as tmp:
                (tmp / "n").write_text(str(n))
    finally:
        done.set()
        watcher.join()
    assert not missing, f"the folder was missing {len(missing)} times"
    assert (out / "n").read_text() == "1000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary or old folder left"


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
