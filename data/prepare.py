"""`fedrec data prepare`: raw transactions → one public catalog + one silo folder per region.

Layout written (atomically, as a whole):
    OUT/catalog.parquet               the public catalog shared by every region
    OUT/<region>/interactions.parquet that region's users only (user_id, item_id, timestamp,
                                      query, basket, split)
    OUT/summary.json                  counts of everything kept and dropped
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedrec.atomic import atomic_dir, write_json
from fedrec.data.regions import RegionMap
from fedrec.data.sources import Ingested, is_online_retail, read_generic, read_online_retail, read_table
from fedrec.data.split import SPLITS, split_by_basket
from fedrec.errors import DataError

SILO_COLUMNS = ["user_id", "item_id", "timestamp", "query", "basket", "split"]


@dataclass
class PrepareResult:
    out: Path
    summary: dict


def ingest(source: str | Path, catalog: str | Path | None = None, regions: RegionMap | None = None,
           default_region: str | None = None) -> Ingested:
    """Reads Online Retail (detected by its columns) or the generic interactions + catalog pair."""
    raw = read_table(source)
    if catalog is not None:
        return read_generic(raw, str(source), catalog, default_region)
    if not is_online_retail(raw):
        raise DataError("not the Online Retail layout and no catalog given", file=str(source),
                        hint="Pass --catalog CATALOG for the generic format.")
    return read_online_retail(raw, str(source), regions or RegionMap.standard())


def prepare(source: str | Path, out: str | Path, catalog: str | Path | None = None,
            regions: RegionMap | None = None, default_region: str | None = None) -> PrepareResult:
    ingested = ingest(source, catalog, regions, default_region)
    interactions, split_report = split_by_basket(ingested.interactions)
    used = set(interactions["item_id"])
    catalog_frame = ingested.catalog[ingested.catalog["item_id"].isin(used)].reset_index(drop=True)
    if interactions.empty:
        raise DataError("no interactions left after cleaning", file=str(source),
                        hint="Check the file holds purchases with known customers.")

    summary = {
        "source": str(source),
        "cleaning": ingested.report,
        "split": split_report,
        "catalog_items": len(catalog_frame),
        "regions": {region: region_summary(group)
                    for region, group in interactions.groupby("region", sort=True)},
    }
    with atomic_dir(out) as tmp:
        catalog_frame.to_parquet(tmp / "catalog.parquet", index=False)
        summary["catalog_sha256"] = hashlib.sha256((tmp / "catalog.parquet").read_bytes()).hexdigest()
        for region, group in interactions.groupby("region", sort=True):
            (tmp / region).mkdir()
            group[SILO_COLUMNS].to_parquet(tmp / region / "interactions.parquet", index=False)
        write_json(tmp / "summary.json", summary)
    return PrepareResult(Path(out), summary)


def region_summary(frame: pd.DataFrame) -> dict:
    baskets = frame.groupby("user_id")["basket"].max() + 1
    out = {
        "users": int(frame["user_id"].nunique()),
        "users_train_only": int((baskets == 1).sum()),
        "users_with_val": int((baskets >= 3).sum()),
        "users_with_test": int((baskets >= 2).sum()),
        "items": int(frame["item_id"].nunique()),
    }
    for split in SPLITS:
        out[f"{split}_interactions"] = int((frame["split"] == split).sum())
    return out
