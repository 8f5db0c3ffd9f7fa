"""The empirical privacy audit on the real Online Retail silos at the demo's DP settings (ε = 8,
δ = 1e-5, the demo's rounds and local epochs): per region, the accounted ε beside the one-run lower
bound from the default number of canaries, its ceiling, and the noise-off control.

    python bench/empirical_audit.py [regions, default eu] [canaries]   → results/empirical_audit.json

Silos come from `fedrec data prepare` of today's code (runs/bench/audit-silos, prepared if
missing); each region spends from a fresh ledger in runs/bench/empirical-audit-records (a what-if:
in a deployment the audit spends from the ledger beside the silo).
"""

from __future__ import annotations

import shutil
import sys
import time

from common import ONLINE_RETAIL, WORK, save, show_progress
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
    shutil.rmtree(records, ignore_errors=True)
    names = regions.split(",")
    config = FedrecConfig.from_flat(DEMO_SETTINGS)
    started = time.perf_counter()
    audits = audit_regions(silos, names, {r: records / r for r in names}, RegionBudget(epsilon=EPSILON, delta=DELTA),
                           config, int(canaries))
    seconds = time.perf_counter() - started
    print(format_empirical(audits))
    save("empirical_audit", {"settings": DEMO_SETTINGS, "epsilon": EPSILON, "delta": DELTA, "silos": str(silos),
                             "canaries": int(canaries), "wall_seconds": seconds,
                             "note": "the host's 2 cores were shared with other jobs during this run",
                             "audits": [a.to_json() for a in audits]})


if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
