"""`fedrec demo`: the whole chain on the real Online Retail data, on one machine.

prepare the regional silos → federated DP training of the teacher over a real loopback Flower
deployment (TLS) → full-ranking evaluation against the baselines → distillation into a small
student → an edge bundle (ONNX FP32 + INT8) → sample recommendations and a search through the
torch-free runtime → privacy audit of the ledgers and of the bundle's claim.
The default configuration is light (it took 22 minutes on two CPU cores shared with another
job); BENCHMARKS.md shows what fuller settings give.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from fedrec.config import FedrecConfig

DEMO_SETTINGS = {                  # light: see BENCHMARKS.md for what fuller settings give
    "federation.rounds": 2,
    "federation.local_epochs": 0.25,
    "federation.evaluate_every": 2,
    "federation.eval_splits": "val",
    "distill.contexts": 1000,
    "distill.epochs": 2,
    "distill.candidates": 64,
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
    echo(f"1/6 preparing regional silos from {source}")
    prepared = prepare(source, out / "silos")
    regions = sorted(prepared.summary["regions"])
    for region, counts in prepared.summary["regions"].items():
        echo(f"    {region}: {counts['users']} users, {counts['users_with_test']} with a test basket")

    echo(f"2/6 federated training with user-level DP (ε={epsilon:g}, δ={delta:g} per region), "
         f"{config.federation.rounds} rounds over a TLS loopback Flower deployment")
    run_dir = out / "federated-run"
    budgets = {r: RegionBudget(epsilon=epsilon, delta=delta) for r in regions}
    simulate(out / "silos", regions, run_dir, config, budgets, tls=True, echo=echo)

    echo("3/6 full-catalog evaluation on every test user")
    silos = load_dataset(out / "silos")
    rankers = build_rankers(silos, [run_dir / "final"], encoder=config.model.encoder or None)
    rankers["federated DP teacher"] = rankers.pop(str(run_dir / "final"))
    report = evaluate(rankers, silos, "test")
    echo(format_report(report, ("ndcg@10", "recall@10", "mrr")))
    write_json(out / "evaluation.json", report)

    echo("4/6 distilling a small student from the DP teacher on public inputs only")
    from fedrec.distill.distill import distill
    from fedrec.edge_runtime import EdgeModel
    from fedrec.export.bundle import export_bundle
    from fedrec.model.teacher import Teacher

    teacher = Teacher.load(run_dir / "final")
    student, _ = distill(teacher, run_dir / "final", silos[regions[0]].catalog, config, out / "student", echo)
    report.update(evaluate({"student": build_rankers(silos, [out / "student"], baselines=False,
                                                     zero_shot=False)[str(out / "student")]}, silos, "test"))
    echo(format_report({k: report[k] for k in ("federated DP teacher", "student")}, ("ndcg@10", "recall@10", "mrr")))
    write_json(out / "evaluation.json", report)

    echo("5/6 edge bundle (ONNX FP32 + INT8) and the torch-free runtime")
    bundle = export_bundle(out / "student", silos[regions[0]].catalog, out / "bundle", tar=True,
                           metrics={k: report[k] for k in ("federated DP teacher", "student")})
    edge = EdgeModel(bundle, "int8")
    catalog = silos[regions[0]].catalog
    for region in regions[:2]:
        user = silos[region].eval_users("test")[0]
        history = [catalog.item_ids[i] for i in user.eval_case("test")[0][:5]]
        echo(f"    a {region} customer who bought: {'; '.join(catalog.titles[catalog.index[i]] for i in history[:3])}")
        for r in edge.recommend(history, 3):
            echo(f"      → {r.title} ({r.score:.2f}, because you bought {r.because})")
    for r in edge.search("christmas lights", 3):
        echo(f"    search 'christmas lights' → {r.title} ({r.score:.2f})")

    echo("6/6 privacy audit of every region's ledger and of the bundle's claim")
    audited = audit([run_dir], bundle=bundle)
    echo(format_audit(audited))
    summary = {"minutes": (time.perf_counter() - started) / 60, "audit_ok": audited.ok,
               "student_parameters": student.parameter_count(),
               "teacher_parameters": teacher.parameter_counts()["total"],
               "artefacts": {"silos": str(out / "silos"), "run": str(run_dir),
                             "teacher": str(run_dir / "final"), "student": str(out / "student"),
                             "bundle": str(bundle), "bundle_archive": str(bundle) + ".tar.gz",
                             "evaluation": str(out / "evaluation.json"),
                             "ledgers": [str(run_dir / "regions" / r / "ledger.jsonl") for r in regions]}}
    write_json(out / "demo-summary.json", summary)
    echo(f"done in {summary['minutes']:.1f} min. Artefacts:")
    for name, path in summary["artefacts"].items():
        echo(f"    {name}: {path}")
    return summary
