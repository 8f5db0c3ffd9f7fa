"""`fedrec` command line. Each command parses options and calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fedrec.errors import FedrecError

app = typer.Typer(help="Federated, differentially private search and recommendation for regional silos.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Turn raw transactions into regional silos.", no_args_is_help=True)
model_app = typer.Typer(help="Encoders for the teacher.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "online-retail" / "online_retail.csv.gz"
ConfigOption = typer.Option(None, "--config", help="TOML file with [model] and [train] tables.")
SetOption = typer.Option([], "--set", help="Override one setting, e.g. --set train.lr=0.0005 (repeatable).")


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        app()
    except FedrecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def _config(config: Optional[Path], overrides: List[str], encoder: Optional[str] = None):
    from fedrec.config import FedrecConfig, parse_overrides

    values = parse_overrides(overrides)
    if encoder is not None:
        values["model.encoder"] = encoder
    return FedrecConfig.load(config, values)


def _regions(spec: str) -> list[str] | None:
    return None if spec in ("", "all") else [r.strip() for r in spec.split(",") if r.strip()]


@data_app.command("prepare")
def data_prepare(
    source: Path = typer.Argument(..., help="Online Retail file (CSV, CSV.GZ, XLSX) or a generic interactions file (CSV/Parquet)."),
    out: Path = typer.Option(..., "--out", help="Output folder: catalog.parquet and one silo folder per region."),
    catalog: Optional[Path] = typer.Option(None, help="Catalog file for the generic format."),
    region_map: Optional[Path] = typer.Option(None, help="JSON/TOML country→region mapping (Online Retail)."),
    region: Optional[str] = typer.Option(None, help="Region of every row, for a generic file without a region column."),
) -> None:
    """Clean, split by basket and write one silo per region plus the shared public catalog."""
    from fedrec.data.prepare import prepare
    from fedrec.data.regions import RegionMap

    regions = RegionMap.from_file(region_map) if region_map else RegionMap.standard()
    result = prepare(source, out, catalog=catalog, regions=regions, default_region=region)
    typer.echo(format_summary(result.summary))
    typer.echo(f"wrote {result.out}")


def format_summary(summary: dict) -> str:
    columns = ["users", "users_train_only", "users_with_val", "users_with_test", "items",
               "train_interactions", "val_interactions", "test_interactions"]
    header = f"{'region':<8}" + "".join(f"{c:>20}" for c in columns)
    rows = [header, "-" * len(header)]
    rows += [f"{r:<8}" + "".join(f"{s[c]:>20}" for c in columns) for r, s in summary["regions"].items()]
    dropped = {**summary["cleaning"], **summary["split"]}
    rows.append("cleaning and split: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    rows.append(f"catalog items: {summary['catalog_items']}")
    return "\n".join(rows)


@model_app.command("tiny")
def model_tiny(out: Path = typer.Option(..., "--out"), hidden: int = 32, layers: int = 2, heads: int = 2,
               seed: int = 0) -> None:
    """Write a tiny randomly initialised encoder (for tests and quick trials)."""
    from fedrec.model.teacher import create_random_encoder

    typer.echo(f"wrote {create_random_encoder(out, hidden, layers, heads, seed)}")


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Output folder of `fedrec data prepare`."),
    out: Path = typer.Option(..., "--out", help="Checkpoint folder (adapters, config, history)."),
    regions: str = typer.Option("all", help="'all' (central, pooled) or a comma list such as 'eu'."),
    encoder: Optional[str] = typer.Option(None, help="Encoder directory (default: bundled all-MiniLM-L6-v2)."),
    config: Optional[Path] = ConfigOption,
    set_: List[str] = SetOption,
) -> None:
    """Train the teacher without privacy: pooled regions (upper bound) or one region (lower bound)."""
    from fedrec.data.silo import load_dataset
    from fedrec.model.teacher import Teacher, pick_device
    from fedrec.training.trainer import fit

    cfg = _config(config, set_, encoder)
    silos = load_dataset(data, _regions(regions))
    teacher = Teacher(cfg.model).to(pick_device())
    result = fit(teacher, silos, cfg, out, log=typer.echo)
    typer.echo(f"best epoch {result.best_epoch}: val NDCG@10 {result.best_val_ndcg:.4f}; saved {out}")


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="Output folder of `fedrec data prepare`."),
    checkpoint: List[Path] = typer.Option([], "--checkpoint", help="Trained checkpoint(s) to compare."),
    regions: str = typer.Option("all", help="'all' or a comma list of regions to evaluate on."),
    split: str = typer.Option("test", help="'test' or 'val'."),
    baselines: bool = typer.Option(True, help="Popularity (global, per region) and co-occurrence."),
    zero_shot: bool = typer.Option(True, help="The pretrained encoder without adapters."),
    encoder: Optional[str] = typer.Option(None, help="Encoder directory for the zero-shot model."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Rank the full catalog for every test user and compare models per region."""
    from fedrec.atomic import write_json
    from fedrec.data.silo import load_dataset
    from fedrec.evaluation.evaluate import build_rankers, evaluate as run, format_report

    if split not in ("test", "val"):
        raise FedrecError(f"--split must be 'test' or 'val', got {split!r}")
    silos = load_dataset(data, _regions(regions))
    rankers = build_rankers(silos, checkpoint, baselines=baselines, zero_shot=zero_shot, encoder=encoder)
    report = run(rankers, silos, split)
    typer.echo(format_report(report))
    if json_out:
        write_json(json_out, {"split": split, "data": str(data), "report": report})
        typer.echo(f"wrote {json_out}")
