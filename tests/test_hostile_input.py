"""Property-based hostile input: every outcome is a result or a clear error, never a traceback,
a hang or a half-written output."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.config import FedrecConfig
from fedrec.data.prepare import prepare
from fedrec.data.regions import REGION_NAME, RegionMap
from fedrec.edge_runtime import BundleError, EdgeModel
from fedrec.edge_runtime.server import make_server
from fedrec.errors import DataError, FedrecError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
timestamp = st.one_of(st.just("2024-01-01T10:00:00"), st.just("2024-03-05 08:00"), st.just("1700000000"),
                      st.just("not a date"), st.just(""), text, st.integers(-10**13, 10**13).map(str))


@FAST
@given(rows=st.lists(st.tuples(st.sampled_from(["u1", "u2", "", "ü"]), st.sampled_from(["i1", "i2", "zz", ""]),
                               timestamp, st.sampled_from(["eu", "uk", ""]), text), min_size=1, max_size=12),
       titles=st.lists(st.one_of(text, st.just("x" * 5000)), min_size=2, max_size=2))
def test_generic_ingestion_gives_silos_or_a_located_error(tmp_path_factory, rows, titles):
    root = tmp_path_factory.mktemp("ingest")
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "region", "query"]).to_csv(root / "i.csv", index=False)
    pd.DataFrame({"item_id": ["i1", "i2"], "title": titles}).to_csv(root / "c.csv", index=False)
    try:
        result = prepare(root / "i.csv", root / "out", catalog=root / "c.csv")
    except DataError as error:
        assert error.file and (error.column or error.row is None)
        assert not (root / "out").exists()
    else:
        assert (root / "out" / "summary.json").is_file()
        assert set(result.summary["regions"]) <= {"eu", "uk"}
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary left behind"


HEADER = b"user_id,item_id,timestamp,region\n"
GOOD_ROW = b"u1,i1,2024-01-01T10:00:00,eu\n"


@FAST
@given(junk=st.binary(max_size=300), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252"]),
       where=st.sampled_from(["body", "header", "catalog"]))
def test_any_bytes_in_the_input_files_give_silos_or_a_located_error(tmp_path_factory, junk, encoding, where):
    """Binary junk, other encodings, cut rows: a DataError naming the file, never a traceback."""
    root = tmp_path_factory.mktemp("bytes")
    rows = "".join(f"u{i % 3},i{i % 2 + 1},2024-01-0{i % 9 + 1}T10:00:00,eu,é{i}\n" for i in range(12))
    interactions = (HEADER.rstrip(b"\n") + b",query\n").decode().encode(encoding) + rows.encode(encoding)
    catalog = "item_id,title\ni1,Crème brûlée dish\ni2,WHITE MUG\n".encode(encoding)
    if where == "body":
        interactions += junk + GOOD_ROW
    elif where == "header":
        interactions = junk + interactions
    else:
        catalog += junk
    (root / "i.csv").write_bytes(interactions)
    (root / "c.csv").write_bytes(catalog)
    try:
        prepare(root / "i.csv", root / "out", catalog=root / "c.csv")
    except DataError as error:
        assert error.file in (str(root / "i.csv"), str(root / "c.csv")), error
        assert not (root / "out").exists()
    else:
        assert (root / "out" / "summary.json").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary left behind"


@pytest.fixture(scope="module")
def small_bundle(prepared, tiny_teacher, tmp_path_factory):
    from fedrec.data.silo import Catalog
    from fedrec.export.bundle import export_bundle

    return export_bundle(tiny_teacher, Catalog.load(prepared / "catalog.parquet"),
                         tmp_path_factory.mktemp("hostile") / "bundle", int8=False, tar=True)


@FAST
@given(name=st.sampled_from(["user_tower.fp32.onnx", "query_encoder.fp32.onnx", "tokenizer.json", "items.npy",
                             "items.json", "manifest.json", "manifest.sha256"]),
       position=st.floats(0, 1), cut=st.booleans())
def test_any_flipped_or_truncated_byte_is_refused(small_bundle, tmp_path_factory, name, position, cut):
    copy = shutil.copytree(small_bundle, tmp_path_factory.mktemp("flip") / "b")
    data = bytearray((copy / name).read_bytes())
    at = min(int(position * len(data)), len(data) - 1)
    if cut:
        data = data[:at]
    else:
        data[at] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError):
        EdgeModel(copy)


@FAST
@given(cut=st.integers(1, 5000))
def test_truncated_archives_are_refused(small_bundle, tmp_path_factory, cut):
    archive = small_bundle.with_name("bundle.tar.gz").read_bytes()
    path = tmp_path_factory.mktemp("tar") / "b.tar.gz"
    path.write_bytes(archive[: max(0, len(archive) - cut)])
    with pytest.raises(BundleError):
        EdgeModel(path)


@pytest.fixture(scope="module")
def server(small_bundle):
    server = make_server(EdgeModel(small_bundle, "fp32"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
                           max_leaves=10)


@FAST
@given(path=st.sampled_from(["/recommend", "/search", "/similar", "/other"]),
       body=st.one_of(json_values, st.fixed_dictionaries({"query": json_values, "k": json_values}),
                      st.fixed_dictionaries({"history": json_values, "k": json_values}),
                      st.fixed_dictionaries({"item_id": json_values})))
def test_http_api_answers_any_json_with_a_result_or_a_4xx(server, path, body):
    request = urllib.request.Request(server + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload = response.status, json.load(response)
    except urllib.error.HTTPError as error:
        status, payload = error.code, json.load(error)
    assert status in (200, 400, 404), (status, payload)
    assert ("results" in payload) == (status == 200)


@pytest.fixture(scope="module")
def data_files(retail_slice, tmp_path_factory) -> dict[str, bytes]:
    """The first real Online Retail rows in every format `data prepare` reads."""
    frame = pd.read_csv(retail_slice, dtype=str, keep_default_na=False).head(60)
    root = tmp_path_factory.mktemp("formats")
    frame.to_csv(root / "r.csv", index=False)
    (root / "r.csv.gz").write_bytes(gzip.compress((root / "r.csv").read_bytes()))
    frame.to_parquet(root / "r.parquet")
    frame.to_excel(root / "r.xlsx", index=False)
    return {path.name.partition(".")[2]: path.read_bytes() for path in root.iterdir()}


@FAST
@given(suffix=st.sampled_from(["csv", "csv.gz", "parquet", "xlsx"]), position=st.floats(0, 1), cut=st.booleans())
def test_any_cut_or_flipped_data_file_gives_silos_or_a_located_error(data_files, tmp_path_factory, suffix,
                                                                     position, cut):
    """A cut .csv.gz once ended the CLI with only "Aborted."."""
    data = bytearray(data_files[suffix])
    at = min(int(position * len(data)), len(data) - 1)
    if cut:
        data = data[:at]
    else:
        data[at] ^= 0xFF
    root = tmp_path_factory.mktemp("damaged")
    (root / f"r.{suffix}").write_bytes(bytes(data))
    try:
        prepare(root / f"r.{suffix}", root / "out")
    except DataError as error:
        assert error.file == str(root / f"r.{suffix}"), error
        assert not (root / "out").exists()
    else:
        assert (root / "out" / "summary.json").is_file()


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    return json.dumps(value)                 # ints, strings (JSON escapes are TOML's), lists


map_scalar = st.one_of(text, st.sampled_from(["eu", "EU", "../x", ".", "catalog.parquet"]), st.integers(), st.booleans())


@FAST
@given(document=st.one_of(json_values, st.fixed_dictionaries({"default": map_scalar, "countries": json_values}),
                          st.fixed_dictionaries({"default": map_scalar,
                                                 "countries": st.dictionaries(text, map_scalar, max_size=3)})),
       as_toml=st.booleans())
def test_any_region_map_gives_a_mapping_or_a_located_error(tmp_path_factory, document, as_toml):
    """A region map that was a JSON list once ended in an AttributeError traceback."""
    path = tmp_path_factory.mktemp("map") / ("map.toml" if as_toml else "map.json")
    if as_toml and isinstance(document, dict) and isinstance(document.get("countries"), dict):
        path.write_text(f"default = {toml_value(document['default'])}\n[countries]\n"
                        + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in document["countries"].items()))
    else:
        path.write_text(json.dumps(document))       # for .toml: JSON, which is rarely valid TOML
    try:
        mapping = RegionMap.from_file(path)
    except DataError as error:
        assert error.file == str(path)
    else:
        assert all(REGION_NAME.fullmatch(r) for r in [mapping.default, *mapping.countries.values()])


SETTINGS = sorted(FedrecConfig().to_flat())


@FAST
@given(entries=st.dictionaries(st.one_of(st.sampled_from(SETTINGS), text),
                               st.one_of(st.integers(-10, 10**6), st.floats(), st.booleans(), text,
                                         st.lists(st.integers(), max_size=2)), max_size=4))
def test_any_config_file_gives_a_config_or_an_error_naming_the_file(tmp_path_factory, entries):
    """Settings out of range (a batch size of 0, a negative learning rate) are refused, naming the
    file and the key; so are values of the wrong type, unknown keys and keys outside a table."""
    tables: dict[str, list[str]] = {}
    for key, value in entries.items():
        section, _, name = key.rpartition(".")
        tables.setdefault(section, []).append(f"{json.dumps(name)} = {toml_value(value)}")
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text("\n".join(tables.pop("", []) + [f"[{json.dumps(section)}]\n" + "\n".join(lines)
                                                     for section, lines in tables.items()]))
    try:
        config = FedrecConfig.load(path)
    except FedrecError as error:
        assert str(path) in str(error)
    else:
        assert FedrecConfig.from_flat(config.to_flat()) == config, "every value within its range"


@pytest.mark.parametrize("reader", ["data", "region map", "config"])
def test_cli_answers_bad_input_of_each_reader_with_one_located_line_and_rc_2(tmp_path, retail_slice, reader):
    whole = gzip.compress(retail_slice.read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "map.json").write_text("[1, 2]")
    (tmp_path / "config.toml").write_text("[train]\nbatch_size = 0\n")
    args, located = {
        "data": (["data", "prepare", tmp_path / "cut.csv.gz", "--out", tmp_path / "out"], f"file {tmp_path / 'cut.csv.gz'}"),
        "region map": (["data", "prepare", retail_slice, "--out", tmp_path / "out", "--region-map", tmp_path / "map.json"],
                       f"file {tmp_path / 'map.json'}"),
        "config": (["config", "show", "--config", tmp_path / "config.toml"], f"config {tmp_path / 'config.toml'}: "
                   "setting 'train.batch_size' must be at least 1, got 0"),
    }[reader]
    result = subprocess.run([sys.executable, "-m", "fedrec.tools", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert located in result.stderr
