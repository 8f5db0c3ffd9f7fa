"""The command line as a user meets it: what it shows, what it checks before starting, and the
errors it answers a mistake with. Most run the typer app in this process (a FedrecError is what
`main` prints as one line with rc 2); what needs the real exit code runs `python -m fedrec.tools`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedrec.atomic import OUTPUT_MARKER
from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog, load_dataset
from fedrec.edge_runtime import verify_bundle
from fedrec.errors import FedrecError
from fedrec.evaluation.evaluate import build_rankers, evaluate
from fedrec.export.bundle import export_bundle
from fedrec.tools.cli import app


def test_config_show_lists_every_setting_with_its_value_default_meaning_and_range():
    result = CliRunner().invoke(app, ["config", "show", "--set", "train.lr=0.01"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert list(rows) == list(FedrecConfig().to_flat()), "every --set key, in order"
    assert all(len(row.split(maxsplit=2)) == 3 for row in rows.values()), "each with a value and a meaning"
    assert "AdamW learning rate of the tower; default 0.002; must be above 0" in rows["train.lr"]
    assert rows["train.batch_size"].split()[1] == "512" and "must be at least 1" in rows["train.batch_size"]


@pytest.mark.parametrize("key, value, words", [
    ("train.batch_size", "0", "must be at least 1, got 0"),
    ("federation.rounds", "0", "must be at least 1, got 0"),
    ("train.lr", "-0.001", "must be above 0, got -0.001"),
    ("train.epochs", "-1", "must be at least 1, got -1"),
    ("model.dim", "0", "must be at least 1, got 0"),
    ("federation.local_epochs", "0", "must be above 0, got 0.0"),
    ("federation.trim_fraction", "0.5", "must be below 0.5, got 0.5"),
    ("distill.lr", "inf", "must be a finite number, got inf"),
    ("distill.hidden", "130", "must be a multiple of 'distill.heads', got 130 and 4"),
])
def test_settings_out_of_range_are_refused_naming_the_key(tmp_path, key, value, words):
    with pytest.raises(FedrecError, match=f"setting '{key}' {words}"):
        FedrecConfig.load(overrides={key: value})
    section, _, name = key.partition(".")
    (tmp_path / "config.toml").write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(FedrecError, match=f"config {tmp_path / 'config.toml'}: setting '{key}'"):
        FedrecConfig.load(tmp_path / "config.toml")


def test_every_default_is_within_its_range():
    assert FedrecConfig.from_flat(FedrecConfig().to_flat()) == FedrecConfig()


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "{data}", "--regions", "eu,../x", "--out", "{tmp}/out"], "--regions: '../x' is not a region name"),
    (["train", "--data", "{data}", "--regions", "EU,xx", "--dp", "--out", "{tmp}/out"], "unknown region(s) xx"),
    (["evaluate", "--data", "{data}", "--regions", "/etc"], "--regions: '/etc' is not a region name"),
    (["client", "--region", "../x", "--data", "{data}/eu", "--superlink", "127.0.0.1:1", "--insecure"],
     "--region: '../x' is not a region name"),
    (["client", "--region", "xx", "--data", "{data}/xx", "--superlink", "127.0.0.1:1", "--insecure"],
     "no interactions.parquet in the silo folder"),
    (["data", "prepare", "{data}/eu/interactions.parquet", "--catalog", "{data}/catalog.parquet", "--region", "..",
      "--out", "{tmp}/out"], "--region: '..' is not a region name (1 to 32 of a-z, 0-9"),
])
def test_region_options_are_checked_before_anything_starts(prepared, tmp_path, args, words):
    result = CliRunner().invoke(app, [a.format(data=prepared, tmp=tmp_path) for a in args])
    assert isinstance(result.exception, FedrecError) and words in str(result.exception), result.output
    assert list(tmp_path.iterdir()) == [], "nothing started, nothing written"


def test_simulate_with_a_region_without_a_silo_fails_at_once(prepared, tmp_path):
    """`simulate --regions eu,xx` with no xx silo used to start a SuperLink and run on for minutes."""
    result = subprocess.run([sys.executable, "-m", "fedrec.tools", "simulate", "--data", str(prepared), "--regions",
                             "eu,xx", "--insecure", "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown region(s) xx; this dataset has eu, row, uk" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing was started"


@pytest.fixture(scope="module")
def bundle(prepared, tiny_teacher, tmp_path_factory):
    return export_bundle(tiny_teacher, Catalog.load(prepared / "catalog.parquet"),
                         tmp_path_factory.mktemp("cli") / "bundle", int8=False, tar=True)


def test_export_never_replaces_a_folder_it_did_not_write(prepared, tiny_teacher, bundle, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(FedrecError, match="is not a folder fedrec wrote"):
        export_bundle(tiny_teacher, Catalog.load(prepared / "catalog.parquet"), foreign, int8=False)
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    assert (bundle / OUTPUT_MARKER).is_dir() and verify_bundle(bundle), "the marker is no file of the bundle"


@pytest.mark.parametrize("archive", [False, True])
def test_recommend_needs_one_known_history_id(prepared, bundle, archive):
    """Only unknown ids once printed a warning and arbitrary items with rc 0."""
    path = bundle.with_name("bundle.tar.gz") if archive else bundle
    unknown = CliRunner().invoke(app, ["recommend", str(path), "--history", "NOPE,ZZZ", "--precision", "fp32"])
    assert isinstance(unknown.exception, FedrecError)
    assert "no --history id is in the bundle's catalog: NOPE, ZZZ" in str(unknown.exception)
    known = load_dataset(prepared)["eu"].catalog.item_ids[0]
    partly = CliRunner().invoke(app, ["recommend", str(path), "--history", f"NOPE,{known}", "--precision", "fp32",
                                      "--k", "3"])
    assert partly.exit_code == 0 and "ignored unknown item ids: NOPE" in partly.stderr
    assert len(partly.stdout.splitlines()) == 3


def test_train_says_what_it_does_before_its_first_bar_and_shows_validation(prepared, tiny_encoder, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(prepared), "--out", str(tmp_path / "teacher"),
                                      "--encoder", str(tiny_encoder), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "loading the silos of eu, row, uk"
    assert lines[1].startswith("encoding the catalog's ") and "item texts with the frozen encoder" in lines[1]
    assert lines[2].startswith("training on ") and "1 epoch(s) of" in lines[2]
    assert "epoch 1/1 validation eu" in result.stderr and "epoch 1/1 validation uk" in result.stderr


def test_evaluate_shows_progress_for_every_ranker_and_region(prepared, capsys):
    silos = load_dataset(prepared)
    rankers = build_rankers(silos, [], zero_shot=False)
    report = evaluate(rankers, silos)
    shown = capsys.readouterr().err
    for name in rankers:
        for region in silos:
            assert f"{name} on test {region}" in shown
    assert "EASE λ=30 on val eu" in shown
    assert set(report) == set(rankers)
