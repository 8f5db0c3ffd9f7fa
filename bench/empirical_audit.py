"""The empirical privacy audit on the real Online Retail silos at the demo's DP settings (ε = 8,
δ = 1e-5, the demo's rounds and local epochs): per region, the accounted ε beside the one-run lower
bound from the default number of canaries, its ceiling, and the noise-off control.

    python bench/empirical_audit.py [regions, default eu] [canaries]   → results/empirical_audit.json

Silos come from `fedrec data prepare` of today's code (runs/bench/audit-silos, prepared if
missing); each region spends from a fresh ledger in runs/bench/empirical-audit-records (a what-if:
in a deployment the audit spends from the ledger beside the silo). Each invocation's regions
replace their earlier entry in the results; other regions' entries are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from common import ONLINE_RETAIL, RESULTS, WORK, save, show_progress
from fedrec.config import FedrecConfig
from fedrec.data.prepare import prepare
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.empirical import DEFAULT_CANARIES, audit_regions, format_empirical
from fedrec.tools.demo import DEMO_SETTINGS

EPSILON, DELTA = 8.0, 1e-5


def main(regions: str = "eu", canaries: str = str(DEFAULT_CANARIES)) -> None:
    silos = WORK / "audit-silos"
    if not (silos / "summary.json").is_file():
        prepare(ONLINE_RETAIL, silos)
    records = WORK / "empirical-audit-records"
    names = regions.split(",")
    for region in names:
        shutil.rmtree(records / region, ignore_errors=True)
    config = FedrecConfig.from_flat(DEMO_SETTINGS)
    started = time.perf_counter()
    audits = audit_regions(silos, names, {r: records / r for r in names}, RegionBudget(epsilon=EPSILON, delta=DELTA),
                           config, int(canaries))
    seconds = time.perf_counter() - started
    print(format_empirical(audits))
    path = RESULTS / "empirical_audit.json"
    earlier = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [r for r in earlier if not set(r["regions"]) & set(names)] + [{
        "regions": names, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": seconds,
        "load_average_after": os.getloadavg(), "audits": [a.to_json() for a in audits]}]
    save("empirical_audit", {"settings": DEMO_SETTINGS, "epsilon": EPSILON, "delta": DELTA, "silos": str(silos),
                             "canaries": int(canaries), "runs": runs})


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
