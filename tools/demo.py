"""`fedrec demo`: the whole chain on the real Online Retail data, on one machine.

prepare the regional silos → federated DP training of the teacher's tower over a real loopback
Flower deployment (TLS) → full-ranking evaluation beside the non-private peers (popularity,
co-occurrence, ItemKNN, EASE) → distillation of a small query encoder → an edge bundle (ONNX FP32 +
INT8), itself evaluated through the torch-free runtime's public API → sample recommendations and a
search → privacy audit of the ledgers and of the bundle's claim.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedrec.config import FedrecConfig
from fedrec.errors import FedrecError

log = logging.getLogger(__name__)

DEMO_SETTINGS = {                  # sized for about 10 minutes on 2 CPU cores; BENCHMARKS.md has fuller runs
    "federation.rounds": 6,
    "federation.local_epochs": 2.0,
    "federation.evaluate_every": 0,
    "distill.epochs": 4,
    "distill.queries_per_item": 2,
}
SHOWN = ("ndcg@10", "recall@10", "mrr")


def run_demo(source: Path, out: Path, config: FedrecConfig | None = None, epsilon: float = 8.0,
             delta: float = 1e-5) -> dict:
    from fedrec.atomic import write_json
    from fedrec.data.prepare import prepare
    from fedrec.data.silo import load_dataset
    from fedrec.distill.distill import distill
    from fedrec.edge_runtime import EdgeModel
    from fedrec.evaluation.evaluate import build_rankers, evaluate, evaluate_ranker, format_report
    from fedrec.export.bundle import export_bundle
    from fedrec.federation.launch import simulate
    from fedrec.federation.region import default_state_dir
    from fedrec.model.teacher import Teacher
    from fedrec.privacy.audit import audit, format_audit
    from fedrec.privacy.budget import RegionBudget
    from fedrec.privacy.ledger import LEDGER_FILE
    from fedrec.tools.bundle_eval import BundleRanker

    config = config or FedrecConfig.from_flat(DEMO_SETTINGS)
    started = time.perf_counter()
    out = out.resolve()
    if (out / "federated-run").exists():
        raise FedrecError(f"{out} holds an earlier demo, whose regions spent their privacy budgets on these users",
                          hint=f"Pass another --out, or delete {out} (which discards its privacy records) to start over.")
    log.info(f"1/6 preparing regional silos from {source}")
    prepared = prepare(source, out / "silos")
    regions = sorted(prepared.summary["regions"])
    for region, counts in prepared.summary["regions"].items():
        log.info(f"    {region}: {counts['users']} users, {counts['users_with_test']} with a test basket")

    log.info(f"2/6 federated training with user-level DP (lifetime ε={epsilon:g}, δ={delta:g} per region; "
             f"records beside each silo in {out / 'silos'}/<region>/.fedrec), "
             f"{config.federation.rounds} rounds over a TLS loopback Flower deployment")
    run_dir = out / "federated-run"
    budgets = {r: RegionBudget(epsilon=epsilon, delta=delta) for r in regions}
    simulate(out / "silos", regions, run_dir, config, budgets, tls=True)

    log.info("3/6 full-catalog evaluation on every test user, beside the non-private peers")
    silos = load_dataset(out / "silos")
    catalog = silos[regions[0]].catalog
    rankers = build_rankers(silos, [run_dir / "final"], encoder=config.model.encoder or None)
    rankers["federated DP teacher"] = rankers.pop(str(run_dir / "final"))
    report = evaluate(rankers, silos, "test")
    log.info(format_report(report, SHOWN))
    write_json(out / "evaluation.json", report)

    log.info("4/6 distilling a small query encoder from the DP teacher on public inputs only")
    teacher = Teacher.load(run_dir / "final", catalog)
    student, _ = distill(teacher, run_dir / "final", config, out / "student")

    log.info("5/6 edge bundle (ONNX FP32 + INT8), evaluated through the torch-free runtime")
    bundle = export_bundle(out / "student", catalog, out / "bundle", tar=True)   # no metrics: they are not DP
    edge = EdgeModel(bundle, "int8")
    report["bundle (INT8, runtime API)"] = evaluate_ranker(BundleRanker(edge, catalog), silos, "test")
    write_json(out / "evaluation.json", report)
    compared = ("co-occurrence", "federated DP teacher", "bundle (INT8, runtime API)")
    log.info(format_report({k: report[k] for k in compared}, SHOWN))
    for region in regions[:2]:
        user = silos[region].eval_users("test")[0]
        history, ages, _, _ = user.eval_case("test")
        ids = [catalog.item_ids[i] for i in history]
        basket = "; ".join(catalog.titles[i] for i in history[ages == 0][:3])
        log.info(f"    a {region} customer whose last basket held: {basket}")
        for r in edge.recommend(ids, 3, ages=ages.tolist()):
            log.info(f"      → {r.title} ({r.score:.1f}, closest to {r.because})")
    for r in edge.search("christmas lights", 3):
        log.info(f"    search 'christmas lights' → {r.title} ({r.score:.1f})")

    log.info("6/6 privacy audit of every region's ledger and of the bundle's claim")
    audited = audit([run_dir, out / "silos"], bundle=bundle)
    log.info(format_audit(audited))
    summary = {"minutes": (time.perf_counter() - started) / 60, "audit_ok": audited.ok,
               "test_ndcg@10": {k: v["overall"]["ndcg@10"] for k, v in report.items()},
               "student_parameters": student.parameter_count(),
               "teacher_parameters": teacher.parameter_counts(),
               "artefacts": {"silos": str(out / "silos"), "run": str(run_dir),
                             "teacher": str(run_dir / "final"), "student": str(out / "student"),
                             "bundle": str(bundle), "bundle_archive": str(bundle) + ".tar.gz",
                             "evaluation": str(out / "evaluation.json"),
                             "ledgers": [str(default_state_dir(out / "silos" / r) / LEDGER_FILE) for r in regions]}}
    write_json(out / "demo-summary.json", summary)
    log.info(f"done in {summary['minutes']:.1f} min. Artefacts:")
    for name, path in summary["artefacts"].items():
        log.info(f"    {name}: {path}")
    return summary
