"""Basket-level temporal split.

All lines of an invoice share one timestamp, so their order inside a basket is an artefact:
a "next item" taken from the same basket leaks the answer. We therefore split per user by
whole baskets: each basket reduced to items the user had not bought before, empty baskets
dropped; the last basket is the test target, the one before it validation (when the user has
three or more), everything earlier is training history.
"""

from __future__ import annotations

import pandas as pd

SPLITS = ("train", "val", "test")


def split_by_basket(interactions: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Returns rows with `basket` (0-based per user) and `split`, and a count of what was dropped."""
    keys = ["region", "user_id"]
    frame = interactions.sort_values([*keys, "timestamp", "item_id"], kind="stable")
    baskets_before = frame.drop_duplicates([*keys, "timestamp"]).shape[0]
    report = {"baskets": baskets_before}

    same_line = frame.duplicated([*keys, "timestamp", "item_id"])
    report["duplicate_lines_merged"] = int(same_line.sum())
    frame = frame[~same_line]
    repeat = frame.duplicated([*keys, "item_id"], keep="first")
    report["repeat_purchases_dropped"] = int(repeat.sum())
    frame = frame[~repeat].copy()

    frame["basket"] = (frame.groupby(keys)["timestamp"].rank(method="dense").astype("int64") - 1)
    count = frame.groupby(keys)["basket"].transform("max") + 1
    report["baskets_dropped_no_new_item"] = baskets_before - int(
        frame.drop_duplicates([*keys, "basket"]).shape[0])

    frame["split"] = "train"
    frame.loc[(count >= 2) & (frame["basket"] == count - 1), "split"] = "test"
    frame.loc[(count >= 3) & (frame["basket"] == count - 2), "split"] = "val"
    return frame.reset_index(drop=True), report
