"""Helpers shared by the benchmark scripts: the real data, the machine, the results file."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

from fedrec.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online-retail" / "online_retail.csv.gz"
WORK = REPO / "runs" / "bench"
RESULTS = REPO / "bench" / "results"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def silos_dir() -> Path:
    """The full Online Retail data, prepared once and reused by every benchmark."""
    from fedrec.data.prepare import prepare

    out = WORK / "silos"
    if not (out / "summary.json").is_file():
        prepare(ONLINE_RETAIL, out)
    return out


def save(name: str, results: dict) -> Path:
    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **results})
    print(f"wrote {path}")
    return path


def show_progress() -> None:
    """The library's progress messages (stdlib logging) on the terminal, as the CLI shows them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
