"""Loading a prepared dataset: the public catalog and one region's user records (their baskets
and, where the region has a search log, their searches)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.regions import region_name
from fedrec.errors import DataError
from fedrec.text import item_text

INTERACTIONS_FILE, QUERIES_FILE = "interactions.parquet", "queries.parquet"
SESSION_PREFIX = "query session: "      # the user id of a privacy unit that is a query session


@dataclass
class Catalog:
    """The public catalog. Item i is row i; its text is what the item tower encodes."""

    item_ids: list[str]
    titles: list[str]
    categories: list[str]

    @classmethod
    def load(cls, path: str | Path) -> "Catalog":
        path = Path(path)
        if not path.is_file():
            raise DataError("catalog not found", file=str(path),
                            hint="Run `fedrec data prepare` first, or pass the catalog path.")
        frame = pd.read_parquet(path)
        return cls(frame["item_id"].astype(str).tolist(), frame["title"].astype(str).tolist(),
                   frame.get("category", pd.Series([""] * len(frame))).fillna("").astype(str).tolist())

    def __len__(self) -> int:
        return len(self.item_ids)

    @cached_property
    def index(self) -> dict[str, int]:
        """item id → row; built once (callers look items up in loops)."""
        return {item_id: i for i, item_id in enumerate(self.item_ids)}

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the ids and texts in order: item vectors are rows, so every party must agree."""
        return hashlib.sha256(json.dumps([self.item_ids, self.texts()]).encode()).hexdigest()

    def text(self, item: int) -> str:
        return item_text(self.titles[item], self.categories[item])

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]



@dataclass
class Search:
    """One query of a search log and what was judged relevant for it."""

    query: str
    items: np.ndarray            # catalog positions of the items with relevance > 0
    gains: np.ndarray            # their graded relevance (1 for an implicit click or purchase)


@dataclass
class UserRecord:
    """One user (or one query session) in one region: the unit of privacy. Baskets are item
    indices in time order; searches come from the region's search log."""

    user_id: str
    baskets: list[np.ndarray]
    queries: list[str]
    n_train: int                 # the first n_train baskets are training history
    searches: list[Search] = field(default_factory=list)

    @property
    def train_baskets(self) -> list[np.ndarray]:
        return self.baskets[: self.n_train]

    def has_split(self, split: str) -> bool:
        n = len(self.baskets)
        return {"train": True, "val": n >= 3, "test": n >= 2}[split]

    def target_index(self, split: str) -> int:
        return len(self.baskets) - (1 if split == "test" else 2)

    def eval_case(self, split: str) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
        """(history newest first, its basket ages, query, target items) for a `val` or `test` evaluation."""
        target = self.target_index(split)
        return (*history_newest_first(self.baskets[:target]), self.queries[target], self.baskets[target])


def history_newest_first(baskets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The items of time-ordered `baskets`, newest basket first, and each item's basket age
    (0 = the most recent basket)."""
    if not baskets:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    newest_first = baskets[::-1]
    items = np.concatenate(newest_first).astype(np.int64)
    ages = np.repeat(np.arange(len(newest_first)), [len(b) for b in newest_first])
    return items, ages


@dataclass
class Silo:
    region: str
    catalog: Catalog
    users: list[UserRecord]

    def eval_users(self, split: str) -> list[UserRecord]:
        return [u for u in self.users if u.has_split(split)]


def dataset_regions(root: str | Path, names: list[str] | None = None) -> list[str]:
    """The regions of a prepared dataset (its silo folders), or those of them `names` gives (none:
    all), normalised and checked to be among them before anything starts, not minutes into a run."""
    root = Path(root)
    available = sorted(p.name for p in root.iterdir()
                       if (p / INTERACTIONS_FILE).is_file() or (p / QUERIES_FILE).is_file()) \
        if root.is_dir() else []
    if not available:
        raise DataError("no region silos found", file=str(root),
                        hint="Point at the output folder of `fedrec data prepare`.")
    if not names:
        return available
    names = list(dict.fromkeys(region_name(name) for name in names))
    unknown = [name for name in names if name not in available]
    if unknown:
        raise DataError(f"unknown region(s) {', '.join(unknown)}; this dataset has {', '.join(available)}",
                        file=str(root))
    return names


def load_silo(silo_dir: str | Path, catalog: Catalog | None = None) -> Silo:
    """A region's silo folder; the catalog defaults to ../catalog.parquet next to it. A searcher
    who also bought (same user id) is one record with both; query sessions are records of their own."""
    silo_dir = Path(silo_dir)
    interactions, queries = silo_dir / INTERACTIONS_FILE, silo_dir / QUERIES_FILE
    if not (interactions.is_file() or queries.is_file()):
        raise DataError(f"no {INTERACTIONS_FILE} in the silo folder (nor a search log, {QUERIES_FILE})",
                        file=str(silo_dir),
                        hint="Point at OUT/<region> written by `fedrec data prepare`.")
    catalog = catalog or Catalog.load(silo_dir.parent / "catalog.parquet")
    users = {user.user_id: user for user in (basket_users(interactions, catalog) if interactions.is_file() else [])}
    sessions = []
    for (unit, session), searches in (search_units(queries, catalog) if queries.is_file() else {}).items():
        if session:
            sessions.append(UserRecord(f"{SESSION_PREFIX}{unit}", [], [], 0, searches))
        elif unit in users:
            users[unit].searches = searches
        else:
            users[unit] = UserRecord(unit, [], [], 0, searches)
    return Silo(silo_dir.name, catalog, [*users.values(), *sessions])


def _catalog_positions(frame: pd.DataFrame, catalog: Catalog, path: Path) -> pd.Series:
    items = frame["item_id"].astype(str).map(catalog.index)
    if items.isna().any():
        row = int(np.flatnonzero(items.isna().to_numpy())[0])
        raise DataError(f"item {frame['item_id'].iloc[row]!r} is not in the catalog", file=str(path),
                        row=row + 1, column="item_id")
    return items.astype(np.int64)


def basket_users(path: Path, catalog: Catalog) -> list[UserRecord]:
    """The users of an interactions file, with their baskets in time order."""
    frame = pd.read_parquet(path)
    frame = frame.assign(item=_catalog_positions(frame, catalog, path)).sort_values(["user_id", "basket", "item"],
                                                                                  kind="stable")
    user_ids = frame["user_id"].astype(str).to_numpy()
    basket_ids = frame["basket"].to_numpy()
    basket_starts = np.flatnonzero(np.r_[True, (user_ids[1:] != user_ids[:-1])
                                         | (basket_ids[1:] != basket_ids[:-1])])
    basket_items = np.split(frame["item"].to_numpy(), basket_starts[1:])
    first = frame.iloc[basket_starts]
    queries = frame.assign(query=frame["query"].fillna("").astype(str).str.strip()) \
        .groupby(["user_id", "basket"], sort=True)["query"].agg(lambda q: next((x for x in q if x), ""))
    users = []
    user_starts = np.flatnonzero(np.r_[True, first["user_id"].to_numpy()[1:] != first["user_id"].to_numpy()[:-1]])
    for start, end in zip(user_starts, [*user_starts[1:], len(first)]):
        user_id = str(first["user_id"].iloc[start])
        is_train = first["split"].to_numpy()[start:end] == "train"
        users.append(UserRecord(user_id, basket_items[start:end],
                                list(queries.loc[user_id].to_numpy()), int(is_train.sum())))
    return users


def search_units(path: Path, catalog: Catalog) -> dict[tuple[str, bool], list[Search]]:
    """(unit id, is a query session) → that unit's searches, each query with its relevant items;
    a query judged only not relevant teaches nothing and is left out."""
    frame = pd.read_parquet(path)
    frame = frame.assign(item=_catalog_positions(frame, catalog, path))
    frame = frame[frame["relevance"] > 0]
    units: dict[tuple[str, bool], list[Search]] = {}
    for (unit, session, query), rows in frame.groupby(["unit", "session", "query"], sort=True):
        units.setdefault((str(unit), bool(session)), []).append(
            Search(str(query), rows["item"].to_numpy(), rows["relevance"].to_numpy(dtype=np.float64)))
    return units


def load_dataset(root: str | Path, regions: list[str] | None = None) -> dict[str, Silo]:
    """Every region (or the named ones) of a prepared dataset, sharing one catalog."""
    root = Path(root)
    regions = dataset_regions(root, regions)
    catalog = Catalog.load(root / "catalog.parquet")
    return {region: load_silo(root / region, catalog) for region in regions}
