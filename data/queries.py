"""A region's search log: `query,item_id[,relevance][,user_id][,timestamp]`, one row per judged
(query, item) pair.

relevance  a whole number ≥ 0, graded (higher = more relevant); 0 = judged not relevant; an absent
           column means every row is an implicit click or purchase (relevance 1)
user_id    who searched. With it, the unit of privacy is that user in this region (the same id as in
           the interactions file is the same person: one unit). Without it, the unit is a query
           session: every row of one query string (compared case- and space-insensitively), so
           whoever typed it, the whole string's log is protected as one unit
timestamp  when (ISO 8601 or Unix seconds); kept, not used for training

The queries are the region's private data: they are read, validated and written into its silo
only; nothing about them leaves the region except through DP-SGD.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedrec.data.sources import (fail_at, no_empty, parse_numbers, parse_timestamps, read_table, refuse_unknown_items,
                                 require_columns)

QUERY_COLUMNS = ["unit", "session", "query", "item_id", "relevance", "timestamp"]
SESSION_UNIT = "a query session (every row of one query string)"
USER_UNIT = "a user (user_id)"


def session_key(query: str) -> str:
    """What makes two query strings one session: case and runs of spaces do not count."""
    return " ".join(query.lower().split())


def read_queries(path: str | Path, item_ids: set[str]) -> tuple[pd.DataFrame, dict]:
    """The rows of one region's queries file, validated (a DataError names the file, data row and
    column), repeated (unit, query, item) rows merged keeping the highest relevance; and a summary.

    Columns of the result: unit (the privacy unit's id), session (True when the unit is a query
    session, not a user), query, item_id, relevance, timestamp (NaT when not given)."""
    file = str(path)
    raw = read_table(path)
    require_columns(raw, ["query", "item_id"], file)
    frame = pd.DataFrame({
        "query": raw["query"].astype(str).str.strip(),
        "item_id": raw["item_id"].astype(str).str.strip(),
    })
    no_empty(frame, "query", "query", file)
    no_empty(frame, "item_id", "item_id", file)
    refuse_unknown_items(frame, item_ids, file,
                         hint="Search can only return catalog items: fix the id or drop the row.")
    if "relevance" in raw:
        relevance = parse_numbers(raw, "relevance", file, integer=True)
        fail_at(relevance < 0, raw, "relevance", file, "a negative relevance (0 = judged not relevant)")
        frame["relevance"] = relevance.astype("int64")
    else:
        frame["relevance"] = 1
    if "user_id" in raw:
        frame["unit"] = raw["user_id"].astype(str).str.strip()
        no_empty(frame, "unit", "user_id", file)
        frame["session"] = False
    else:
        frame["unit"] = frame["query"].map(session_key)
        frame["session"] = True
    frame["timestamp"] = parse_timestamps(raw, "timestamp", file) if "timestamp" in raw \
        else pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns]")

    keys = ["unit", "query", "item_id"]
    merged = frame.sort_values("relevance", ascending=False, kind="stable").drop_duplicates(keys)
    merged = merged.sort_values(keys, kind="stable", ignore_index=True)[QUERY_COLUMNS]
    relevant = merged[merged["relevance"] > 0]
    summary = {
        "rows_read": len(raw),
        "repeated_rows_merged": len(frame) - len(merged),
        "judged_not_relevant": int((merged["relevance"] == 0).sum()),
        "queries": int(merged[["unit", "query"]].drop_duplicates().shape[0]),
        "queries_without_relevant_items": int(merged[["unit", "query"]].drop_duplicates().shape[0]
                                              - relevant[["unit", "query"]].drop_duplicates().shape[0]),
        "privacy_units": int(merged["unit"].nunique()),
        "privacy_unit": USER_UNIT if "user_id" in raw else SESSION_UNIT,
    }
    return merged, summary
