"""`fedrec audit`: verify each region's ledger and every privacy claim made from it.

For each ledger: the hash chain holds; each recorded cumulative ε equals a fresh recomputation
with Opacus' accountant; Google's dp-accounting (PLD) independently agrees within 5 %; no entry
exceeds its budget. For each claim (a run folder's privacy.json, a teacher checkpoint, a
bundle manifest): its ledger head is an entry of that region's chain and its ε is the ε recorded
there. A claim whose head is missing means the ledger was truncated or replaced.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.privacy.accountant import opacus_epsilon, pld_epsilon
from fedrec.privacy.ledger import LEDGER_FILE, Ledger, LedgerError, line_hash

DISAGREEMENT = 0.05


@dataclass
class RegionAudit:
    region: str
    ledger: str
    entries: int = 0
    rounds: list[int] = field(default_factory=list)
    epsilon_per_entry: list[float] = field(default_factory=list)
    epsilon_recorded: float = 0.0
    epsilon_opacus: float = 0.0
    epsilon_pld: float = 0.0
    delta: float = 0.0
    budget_epsilon: float = 0.0
    accountant: str = ""
    head: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class AuditReport:
    regions: dict[str, RegionAudit]
    claims_checked: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.regions.values())

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "claims": self.claims_checked,
                "regions": {r: {**asdict(a), "ok": a.ok} for r, a in self.regions.items()}}


def audit_ledger(region: str, path: Path) -> tuple[RegionAudit, dict[str, float]]:
    """The region's audit and its chain as {line hash: recorded ε}."""
    result = RegionAudit(region, str(path))
    try:
        entries = Ledger(path).entries()
    except LedgerError as exc:
        result.problems.append(str(exc))
        return result, {}
    lines = path.read_text().splitlines()
    heads = {line_hash(line): e.epsilon for line, e in zip(lines, entries)}
    history = []
    for number, entry in enumerate(entries, start=1):
        history.append((entry.noise_multiplier, entry.sample_rate, entry.steps))
        recomputed = opacus_epsilon(history, entry.delta, entry.accountant)
        result.epsilon_per_entry.append(recomputed)
        if not math.isclose(recomputed, entry.epsilon, rel_tol=1e-6, abs_tol=1e-9):
            result.problems.append(f"entry {number}: recorded ε {entry.epsilon:.6f} but the events give "
                                   f"{recomputed:.6f}")
        if recomputed > entry.budget_epsilon * (1 + 1e-9):
            result.problems.append(f"entry {number}: ε {recomputed:.4f} exceeds the budget {entry.budget_epsilon:g}")
        if entry.region != region:
            result.problems.append(f"entry {number}: names region {entry.region!r}, ledger is {region!r}")
    if entries:
        last = entries[-1]
        result.entries, result.rounds = len(entries), [e.round for e in entries]
        result.epsilon_recorded, result.epsilon_opacus = last.epsilon, result.epsilon_per_entry[-1]
        result.epsilon_pld = pld_epsilon(history, last.delta)
        result.delta, result.budget_epsilon, result.accountant = last.delta, last.budget_epsilon, last.accountant
        result.head = line_hash(lines[-1])
        gap = abs(result.epsilon_opacus - result.epsilon_pld) / max(result.epsilon_pld, 1e-12)
        if gap > DISAGREEMENT:
            result.problems.append(f"Opacus ({result.epsilon_opacus:.4f}) and dp-accounting PLD "
                                   f"({result.epsilon_pld:.4f}) disagree by {gap:.1%}")
    return result, heads


def find_ledgers(paths: list[Path]) -> tuple[dict[str, Path], list[tuple[str, dict]]]:
    """Ledgers (region → file) and claims (source, {region: claim}) under the given paths."""
    ledgers: dict[str, Path] = {}
    claims: list[tuple[str, dict]] = []
    for path in paths:
        if not path.exists():
            raise FedrecError(f"{path} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.name == LEDGER_FILE or (path.is_file() and file.suffix == ".jsonl"):
                region = _ledger_region(file)
                if region in ledgers and ledgers[region] != file:
                    raise FedrecError(f"two ledgers for region {region}: {ledgers[region]} and {file}")
                ledgers[region] = file
            elif file.name in ("privacy.json", "teacher.json", "student.json", "manifest.json"):
                found = _claims_in(file)
                if found:
                    claims.append((str(file), found))
    return ledgers, claims


def _ledger_region(path: Path) -> str:
    first = path.read_text().splitlines()[:1]
    try:
        return json.loads(first[0])["region"] if first else path.parent.name
    except (ValueError, KeyError):
        return path.parent.name


def _claims_in(path: Path) -> dict:
    """privacy.json is {region: claim}; checkpoints and bundle manifests carry it under "privacy"."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise FedrecError(f"{path} is not valid JSON: {exc}") from exc
    claims = data if path.name == "privacy.json" else data.get("privacy", {})
    if isinstance(claims, dict) and "regions" in claims:
        claims = claims["regions"]
    return {r: c for r, c in claims.items() if isinstance(c, dict) and "ledger_head" in c} \
        if isinstance(claims, dict) else {}


METADATA = ("manifest.json", "student.json", "teacher.json")


def provenance_chain(path: Path) -> list[tuple[str, dict]]:
    """Claims along bundle → student → teacher, following each file's "source"/"teacher" link."""
    chain, seen = [], set()
    while path is not None and path not in seen:
        seen.add(path)
        meta = path if path.is_file() else next((path / n for n in METADATA if (path / n).is_file()), None)
        if meta is None:
            raise FedrecError(f"{path} has none of {', '.join(METADATA)}")
        chain.append((str(meta), _claims_in(meta)))
        data = json.loads(meta.read_text())
        link = data.get("source") or data.get("teacher")
        path = Path(link) if isinstance(link, str) and Path(link).exists() else None
    return chain


def audit(paths: list[str | Path], bundle: str | Path | None = None) -> AuditReport:
    ledgers, claims = find_ledgers([Path(p) for p in paths])
    if bundle is not None:
        chain = provenance_chain(Path(bundle))
        if not any(found for _, found in chain):
            raise FedrecError(f"{bundle} carries no privacy claim",
                              hint="Pass a bundle, a student or a teacher checkpoint made from a DP run.")
        given = {Path(source).resolve() for source, _ in claims}       # a claim is checked once
        claims.extend((source, found) for source, found in chain if found and Path(source).resolve() not in given)
    if not ledgers:
        raise FedrecError("no ledger found", hint=f"Pass region state folders or {LEDGER_FILE} files.")
    report = AuditReport({})
    chains = {}
    for region, path in sorted(ledgers.items()):
        report.regions[region], chains[region] = audit_ledger(region, path)
    for source, found in claims:
        for region, claim in found.items():
            check = {"source": source, "region": region, "epsilon": claim.get("epsilon"),
                     "ledger_head": claim["ledger_head"], "ok": False}
            if region not in chains:
                check["problem"] = f"no ledger for region {region} was given"
            elif claim["ledger_head"] not in chains[region]:
                check["problem"] = (f"{source}: region {region}'s claimed ledger head is not in its ledger "
                                    "(truncated, replaced or a different ledger)")
            elif not math.isclose(chains[region][claim["ledger_head"]], float(claim.get("epsilon", -1)),
                                  rel_tol=1e-9):
                check["problem"] = (f"{source}: region {region} claims ε={claim.get('epsilon')} but its ledger "
                                    f"records {chains[region][claim['ledger_head']]} at that entry")
            else:
                check["ok"] = True
            if not check["ok"]:
                report.problems.append(check["problem"])
            report.claims_checked.append(check)
    return report


def format_audit(report: AuditReport) -> str:
    header = (f"{'region':<8}{'entries':>8}{'ε recorded':>12}{'ε Opacus':>11}{'ε PLD':>9}{'δ':>9}"
              f"{'budget':>8}{'accountant':>11}  status")
    lines = [header, "-" * len(header)]
    for region, r in report.regions.items():
        lines.append(f"{region:<8}{r.entries:>8}{r.epsilon_recorded:>12.4f}{r.epsilon_opacus:>11.4f}"
                     f"{r.epsilon_pld:>9.4f}{r.delta:>9.1e}{r.budget_epsilon:>8g}{r.accountant:>11}  "
                     + ("ok" if r.ok else "FAIL"))
        lines += [f"    ✗ {p}" for p in r.problems]
    for check in report.claims_checked:
        mark = "✓" if check["ok"] else "✗"
        lines.append(f"{mark} claim {check['region']} ε={check['epsilon']} from {check['source']}"
                     + ("" if check["ok"] else f": {check['problem']}"))
    lines.append("audit passed" if report.ok else "audit FAILED")
    return "\n".join(lines)


def write_html(report: AuditReport, path: str | Path) -> None:
    """A self-contained page: the table and a plot of ε per round against each budget."""
    import base64
    import html
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedrec.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (region, r) in enumerate(report.regions.items()):
        color = f"C{i}"
        ax.plot(r.rounds, r.epsilon_per_entry, marker="o", color=color, label=f"{region} ε")
        if r.budget_epsilon:
            ax.axhline(r.budget_epsilon, color=color, linestyle="--", linewidth=1, label=f"{region} budget")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    body = (f"<h1>fedrec privacy audit: {'passed' if report.ok else 'FAILED'}</h1>"
            f"<pre>{html.escape(format_audit(report))}</pre>"
            f"<img alt='cumulative epsilon per round' src='data:image/png;base64,{image}'>")
    with atomic_file(path) as handle:
        handle.write(f"<!doctype html><meta charset='utf-8'><title>fedrec audit</title>{body}\n")
