"""`fedrec data prepare`: raw transactions → one public catalog + one silo folder per region.

Layout written (atomically, as a whole):
    OUT/catalog.parquet               the public catalog shared by every region: the catalog
                                      given (Online Retail: every product listed), never
                                      filtered by who bought what
    OUT/<region>/interactions.parquet that region's users only (user_id, item_id, timestamp,
                                      query, basket, split)
    OUT/<region>/queries.parquet      that region's search log, when one is given
                                      (`fedrec.data.queries`); a region may have only this
    OUT/summary.json                  counts of everything kept and dropped
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedrec.atomic import atomic_dir, refuse_to_replace, write_json
from fedrec.data.queries import read_queries
from fedrec.data.regions import RegionMap, region_name
from fedrec.data.silo import INTERACTIONS_FILE, QUERIES_FILE
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
            regions: RegionMap | None = None, default_region: str | None = None,
            queries: dict[str, str | Path] | None = None) -> PrepareResult:
    """`queries` maps a region name to its search log file (see `fedrec.data.queries`)."""
    refuse_to_replace_foreign_files(out)
    ingested = ingest(source, catalog, regions, default_region)
    interactions, split_report = split_by_basket(ingested.interactions)
    item_ids = set(ingested.catalog["item_id"])
    queries = {region_name(region, column="queries"): path for region, path in (queries or {}).items()}
    search_logs = {region: read_queries(path, item_ids) for region, path in sorted(queries.items())}
    if interactions.empty and not search_logs:
        raise DataError("no interactions left after cleaning", file=str(source),
                        hint="Check the file holds purchases with known customers.")

    summary = {
        "source": str(source),
        "cleaning": ingested.report,
        "split": split_report,
        "catalog_items": len(ingested.catalog),
        "catalog_items_without_interactions":
            int((~ingested.catalog["item_id"].isin(interactions["item_id"])).sum()),
        "regions": {region: region_summary(group)
                    for region, group in interactions.groupby("region", sort=True)},
        "queries": {region: {"file": str(queries[region]), **report,
                             "users_with_baskets_too": users_with_baskets_too(log, interactions, region)}
                    for region, (log, report) in search_logs.items()},
    }
    with atomic_dir(out) as tmp:
        ingested.catalog.to_parquet(tmp / "catalog.parquet", index=False)
        summary["catalog_sha256"] = hashlib.sha256((tmp / "catalog.parquet").read_bytes()).hexdigest()
        for region, group in interactions.groupby("region", sort=True):
            (tmp / region).mkdir()
            group[SILO_COLUMNS].to_parquet(tmp / region / INTERACTIONS_FILE, index=False)
        for region, (log, _) in search_logs.items():
            (tmp / region).mkdir(exist_ok=True)
            log.to_parquet(tmp / region / QUERIES_FILE, index=False)
        write_json(tmp / "summary.json", summary)
        refuse_to_replace_foreign_files(out)      # again: a region may have started in OUT meanwhile
    return PrepareResult(Path(out), summary)


def refuse_to_replace_foreign_files(out: str | Path) -> None:
    """OUT is replaced as a whole, so it may hold only what `prepare` writes. Anything else is
    someone's: above all a region's privacy records, which live by default beside its silo
    (OUT/<region>/.fedrec/), and whose loss would silently reset that region's privacy budget.
    Then the rule for every output folder (`refuse_to_replace`): it must also be one fedrec wrote."""
    out = Path(out)
    if out.is_dir():
        for path in sorted(p for p in out.rglob("*") if not p.is_dir()):
            relative = path.relative_to(out).parts
            if relative in (("catalog.parquet",), ("summary.json",)) or (
                    len(relative) == 2 and relative[1] in (INTERACTIONS_FILE, QUERIES_FILE)):
                continue
            what = ("a region's privacy records: replacing the folder would reset that region's privacy budget"
                    if ".fedrec" in relative else "replacing the folder would delete it")
            raise DataError(f"{out} holds a file `fedrec data prepare` did not write ({what})", file=str(path),
                            hint=f"Move it out of {out} (a region's state folder can be passed with --state-dir), "
                                 "or prepare into a new --out.")
    refuse_to_replace(out)


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


def users_with_baskets_too(log: pd.DataFrame, interactions: pd.DataFrame, region: str) -> int:
    """Searchers who also bought in the region: one user, so one privacy unit, with both kinds of example."""
    searchers = set(log.loc[~log["session"], "unit"])
    return len(searchers & set(interactions.loc[interactions["region"] == region, "user_id"]))
