"""Readers for the two input formats, each returning the same standard tables.

interactions: user_id, item_id, timestamp, region, query (query may be empty)
catalog:      item_id, title, category, description, price

Every reader validates as it converts; a bad value raises DataError naming the file, the data
row (1-based, header not counted) and the column.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet

from fedrec.data.regions import REGION_NAME, REGION_RULE, RegionMap, region_name
from fedrec.errors import DataError

ONLINE_RETAIL_COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate",
                         "UnitPrice", "CustomerID", "Country"]
# Real products carry a five-digit code, sometimes with a letter suffix (85123A, 84029G).
# Everything else is postage, fees, manual adjustments, samples or vouchers.
PRODUCT_CODE = re.compile(r"^\d{5}[A-Za-z]{0,2}$")
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "region", "query"]
CATALOG_COLUMNS = ["item_id", "title", "category", "description", "price"]
# Silos hold nanosecond timestamps, whose range this is.
TIMESTAMP_RANGE = (pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC"))


@dataclass
class Ingested:
    interactions: pd.DataFrame
    catalog: pd.DataFrame
    report: dict[str, int] = field(default_factory=dict)   # rows seen and dropped, by reason


def read_table(path: str | Path) -> pd.DataFrame:
    """CSV (optionally gzip), Parquet or XLSX, every column as text so that we validate it."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path), hint="Check the path.")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            table = pyarrow.parquet.read_table(path)
            table.validate(full=True)     # else a damaged file's non-UTF-8 text fails later, unlocated
            frame = table.to_pandas()
            for column in frame.columns:
                if not pd.api.types.is_datetime64_any_dtype(frame[column]):
                    frame[column] = frame[column].astype("string").fillna("").astype(str)
            return frame
        if name.endswith((".xlsx", ".xls")):
            frame = pd.read_excel(path, dtype=str, keep_default_na=False)
            return frame.fillna("")
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(path),
                        hint="Re-encode the file as UTF-8.") from exc
    except Exception as exc:
        # pyarrow and openpyxl fail on a damaged Parquet or XLSX file with almost any exception
        # type; text fails with these (EOFError: a cut .gz, which the CLI would print as "Aborted.")
        binary = name.endswith((".parquet", ".pq", ".xlsx", ".xls"))
        if not (binary or isinstance(exc, (ValueError, OSError, ImportError, EOFError, zlib.error))):
            raise
        raise DataError(f"cannot parse: {str(exc) or type(exc).__name__}", file=str(path)) from exc


def is_online_retail(frame: pd.DataFrame) -> bool:
    return bool({"InvoiceNo", "CustomerID"} & set(frame.columns))


def read_online_retail(raw: pd.DataFrame, file: str, regions: RegionMap) -> Ingested:
    """UCI Online Retail (`raw` as read by `read_table`). The catalog is the shop's listing: every
    product on any line, whoever bought or returned it, so that which items it holds reveals no
    purchase; only the interactions are cleaned as a retailer would."""
    require_columns(raw, ONLINE_RETAIL_COLUMNS, file)
    report: dict[str, int] = {"rows_read": len(raw)}

    frame = pd.DataFrame({
        "invoice": raw["InvoiceNo"].astype(str).str.strip(),
        "item_id": raw["StockCode"].astype(str).str.strip().str.upper(),
        "description": raw["Description"].astype(str).str.strip(),
        "quantity": parse_numbers(raw, "Quantity", file, integer=True),
        "timestamp": parse_timestamps(raw, "InvoiceDate", file),
        "price": parse_numbers(raw, "UnitPrice", file),
        "user_id": raw["CustomerID"].astype(str).str.strip().str.replace(r"\.0+$", "", regex=True),
        "country": raw["Country"].astype(str).str.strip(),
    })
    no_empty(frame, "country", "Country", file)
    catalog = _catalog_from_descriptions(frame[frame["item_id"].str.match(PRODUCT_CODE)])

    for reason, should_drop in (
        ("dropped_no_customer", lambda f: f["user_id"] == ""),
        ("dropped_cancellation", lambda f: f["invoice"].str.upper().str.startswith("C")),
        ("dropped_non_product_code", lambda f: ~f["item_id"].str.match(PRODUCT_CODE)),
        ("dropped_non_positive_quantity", lambda f: f["quantity"] <= 0),
        ("dropped_non_positive_price", lambda f: f["price"] <= 0),
    ):
        drop = should_drop(frame)
        report[reason] = int(drop.sum())
        frame = frame[~drop]
    report["rows_kept"] = len(frame)

    interactions = pd.DataFrame({
        "user_id": frame["user_id"].to_numpy(),
        "item_id": frame["item_id"].to_numpy(),
        "timestamp": frame["timestamp"].to_numpy(),
        "region": frame["country"].map(regions).to_numpy(),
        "query": "",
    })
    return Ingested(interactions, catalog, report)


def _catalog_from_descriptions(frame: pd.DataFrame) -> pd.DataFrame:
    """One title per item: its most frequent non-empty description (ties: alphabetical first);
    its price: the median positive price (NaN if the item never had one)."""
    titles = {}
    prices = frame["price"].where(frame["price"] > 0).groupby(frame["item_id"]).median()
    for item_id, descriptions in frame.groupby("item_id")["description"]:
        counts = Counter(d for d in descriptions if d and d.lower() != "nan")
        titles[item_id] = min(counts, key=lambda d: (-counts[d], d)) if counts else item_id
    ids = sorted(titles)
    return pd.DataFrame({
        "item_id": ids,
        "title": [titles[i] for i in ids],
        "category": "",
        "description": "",
        "price": [float(prices[i]) for i in ids],
    })


def read_generic(raw: pd.DataFrame, ifile: str, catalog_path: str | Path,
                 default_region: str | None = None) -> Ingested:
    """The generic format: an interactions table (`raw`) and a catalog table (CSV or Parquet)."""
    cfile = str(catalog_path)
    require_columns(raw, ["user_id", "item_id", "timestamp"], ifile)
    raw_catalog = read_table(catalog_path)
    require_columns(raw_catalog, ["item_id", "title"], cfile)

    catalog = pd.DataFrame({
        column: (raw_catalog[column].astype(str).str.strip() if column in raw_catalog else "")
        for column in ("item_id", "title", "category", "description")
    })
    catalog["price"] = (parse_numbers(raw_catalog, "price", cfile) if "price" in raw_catalog
                        else np.nan)
    no_empty(catalog, "item_id", "item_id", cfile)
    no_empty(catalog, "title", "title", cfile)
    duplicated = catalog["item_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"duplicate item_id {catalog['item_id'].iloc[row]!r}", file=cfile,
                        row=row + 1, column="item_id", hint="Each catalog item must appear once.")

    if "region" in raw:
        region = raw["region"].astype(str).str.strip().str.lower()
    elif default_region:
        region = pd.Series(region_name(default_region), index=raw.index)
    else:
        raise DataError("no 'region' column", file=ifile, column="region",
                        hint="Add a region column or pass --region NAME for a single-region file.")
    interactions = pd.DataFrame({
        "user_id": raw["user_id"].astype(str).str.strip(),
        "item_id": raw["item_id"].astype(str).str.strip(),
        "timestamp": parse_timestamps(raw, "timestamp", ifile),
        "region": region,
        "query": raw["query"].astype(str).str.strip() if "query" in raw else "",
    })
    for column in ("user_id", "item_id", "region"):
        no_empty(interactions, column, column, ifile)
    fail_at(~interactions["region"].str.fullmatch(REGION_NAME.pattern), interactions, "region", ifile,
             f"not a region name ({REGION_RULE})")
    refuse_unknown_items(interactions, set(catalog["item_id"]), ifile,
                         hint=f"Add the items to {cfile} or remove those rows.")
    report = {"rows_read": len(raw), "rows_kept": len(interactions)}
    return Ingested(interactions, catalog.sort_values("item_id", ignore_index=True), report)


def require_columns(frame: pd.DataFrame, columns: list[str], file: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}",
                        file=file, column=missing[0])


def refuse_unknown_items(frame: pd.DataFrame, item_ids: set[str], file: str, hint: str) -> None:
    unknown = ~frame["item_id"].isin(item_ids)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"item_id {frame['item_id'].iloc[row]!r} is not in the catalog "
                        f"({int(unknown.sum())} rows name unknown items)",
                        file=file, row=row + 1, column="item_id", hint=hint)


def fail_at(mask: pd.Series, frame: pd.DataFrame, column: str, file: str, what: str) -> None:
    if mask.any():
        row = int(np.flatnonzero(mask.to_numpy())[0])
        raise DataError(f"{what}: {str(frame[column].iloc[row])[:80]!r} "
                        f"({int(mask.sum())} such rows)", file=file, row=row + 1, column=column)


def no_empty(frame: pd.DataFrame, column: str, label: str, file: str) -> None:
    empty = frame[column].astype(str).str.strip() == ""
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(f"empty value ({int(empty.sum())} such rows)", file=file, row=row + 1,
                        column=label)


def parse_numbers(frame: pd.DataFrame, column: str, file: str, integer: bool = False) -> pd.Series:
    text = frame[column].astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce")
    fail_at(values.isna() | ~np.isfinite(values), frame, column, file, "not a number")
    if integer:
        fail_at(values != values.round(), frame, column, file, "not a whole number")
    return values.astype("float64")


def parse_timestamps(frame: pd.DataFrame, column: str, file: str) -> pd.Series:
    """ISO timestamps, the original UCI 'M/D/YYYY H:MM' text, Excel dates or Unix seconds."""
    values = frame[column]
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = pd.to_datetime(values, utc=True)
    else:
        text = values.astype(str).str.strip()
        numeric = pd.to_numeric(text, errors="coerce")
        if numeric.notna().all() and len(text):
            parsed = pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")
        else:
            parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
            retry = parsed.isna()
            if retry.any():
                parsed[retry] = pd.to_datetime(text[retry], format="%m/%d/%Y %H:%M", utc=True,
                                               errors="coerce")
    fail_at(parsed.isna(), frame, column, file, "not a timestamp (use ISO 8601 or Unix seconds)")
    earliest, latest = TIMESTAMP_RANGE
    fail_at((parsed < earliest) | (parsed > latest), frame, column, file,
             f"a timestamp outside {earliest:%Y-%m-%d} to {latest:%Y-%m-%d}")
    return parsed.dt.tz_convert(None).astype("datetime64[ns]")
