"""`fedrec demo`: the whole chain on the real Online Retail data, on one machine.

prepare the regional silos → federated DP training of the teacher over a real loopback Flower
deployment (TLS) → full-ranking evaluation against the baselines → privacy audit.
The default configuration is light enough for about ten minutes on two CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from fedrec.config import FedrecConfig

DEMO_SETTINGS = {
    "federation.rounds": 2,
    "federation.local_epochs": 1,
    "federation.evaluate_every": 2,
    "federation.eval_splits": "val",
}


def run_demo(source: Path, out: Path, config: FedrecConfig | None = None, epsilon: float = 8.0,
             delta: float = 1e-5, echo: Callable[[str], None] = print) -> dict:
    from fedrec.atomic import write_json
    from fedrec.data.prepare import prepare
    from fedrec.data.silo import load_dataset
    from fedrec.evaluation.evaluate import build_rankers, evaluate, format_report
    from fedrec.federation.launch import simulate
    from fedrec.privacy.audit import audit, format_audit
    from fedrec.privacy.budget import RegionBudget

    config = config or FedrecConfig.from_flat(DEMO_SETTINGS)
    started = time.perf_counter()
    out = out.resolve()
    echo(f"1/4 preparing regional silos from {source}")
    prepared = prepare(source, out / "silos")
    regions = sorted(prepared.summary["regions"])
    for region, counts in prepared.summary["regions"].items():
        echo(f"    {region}: {counts['users']} users, {counts['users_with_test']} with a test basket")

    echo(f"2/4 federated training with user-level DP (ε={epsilon:g}, δ={delta:g} per region), "
         f"{config.federation.rounds} rounds over a TLS loopback Flower deployment")
    run_dir = out / "federated-run"
    budgets = {r: RegionBudget(epsilon=epsilon, delta=delta) for r in regions}
    simulate(out / "silos", regions, run_dir, config, budgets, tls=True, echo=echo)

    echo("3/4 full-catalog evaluation on every test user")
    silos = load_dataset(out / "silos")
    rankers = build_rankers(silos, [run_dir / "final"], encoder=config.model.encoder or None)
    rankers["federated DP teacher"] = rankers.pop(str(run_dir / "final"))
    report = evaluate(rankers, silos, "test")
    echo(format_report(report, ("ndcg@10", "recall@10", "mrr")))
    write_json(out / "evaluation.json", report)

    echo("4/4 privacy audit of every region's ledger and of the run's claims")
    audited = audit([run_dir])
    echo(format_audit(audited))
    summary = {"minutes": (time.perf_counter() - started) / 60, "audit_ok": audited.ok,
               "artefacts": {"silos": str(out / "silos"), "run": str(run_dir),
                             "teacher": str(run_dir / "final"), "evaluation": str(out / "evaluation.json"),
                             "ledgers": [str(run_dir / "regions" / r / "ledger.jsonl") for r in regions]}}
    write_json(out / "demo-summary.json", summary)
    echo(f"done in {summary['minutes']:.1f} min. Artefacts:")
    for name, path in summary["artefacts"].items():
        echo(f"    {name}: {path}")
    return summary
