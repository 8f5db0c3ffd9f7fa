"""Shared fixtures: a small real slice of UCI Online Retail and a tiny random encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (`make test`) each worker takes one core's share of torch threads, so
    the workers do not fight over the same cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))


ONLINE_RETAIL = Path(os.environ.get("FEDREC_ONLINE_RETAIL",
                                    REPO.parent / "shared" / "data" / "online-retail" / "online_retail.csv.gz"))


@pytest.fixture(scope="session")
def retail_raw() -> pd.DataFrame:
    if not ONLINE_RETAIL.is_file():
        pytest.fail(f"the shared Online Retail file is missing at {ONLINE_RETAIL}; "
                    "set FEDREC_ONLINE_RETAIL to its path")
    return pd.read_csv(ONLINE_RETAIL, dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def retail_slice(retail_raw, tmp_path_factory) -> Path:
    """Every row of a fixed set of real customers from the UK, the EU and elsewhere,
    plus some rows without a customer, in the original layout."""
    known = retail_raw[retail_raw["CustomerID"] != ""]
    invoices = known.groupby("CustomerID")["InvoiceNo"].nunique()
    countries = known.groupby("CustomerID")["Country"].first()
    chosen = []
    for country, count in (("United Kingdom", 30), ("Germany", 8), ("France", 6), ("EIRE", 2),
                           ("Channel Islands", 2), ("Australia", 3), ("Japan", 2)):
        ids = sorted(countries[(countries == country) & (invoices >= 3)].index)[:count]
        chosen.extend(ids)
    rows = retail_raw[retail_raw["CustomerID"].isin(chosen)]
    rows = pd.concat([rows, retail_raw[retail_raw["CustomerID"] == ""].head(50)]).sort_index()
    path = tmp_path_factory.mktemp("retail") / "slice.csv"
    rows.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def prepared(retail_slice, tmp_path_factory) -> Path:
    from fedrec.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "silos"
    prepare(retail_slice, out)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    from fedrec.model.teacher import create_random_encoder

    return create_random_encoder(tmp_path_factory.mktemp("encoder") / "tiny", hidden=32, layers=2, heads=2)


@pytest.fixture(scope="session")
def tiny_teacher(prepared, tiny_encoder, tmp_path_factory) -> Path:
    """An untrained teacher checkpoint over the tiny encoder and the prepared slice's catalog."""
    import torch

    from fedrec.config import FedrecConfig
    from fedrec.data.silo import Catalog
    from fedrec.model.teacher import Teacher

    torch.manual_seed(0)
    teacher = Teacher(FedrecConfig.from_flat({"model.encoder": str(tiny_encoder)}).model,
                      Catalog.load(prepared / "catalog.parquet"))
    return teacher.save(tmp_path_factory.mktemp("teacher") / "teacher")
