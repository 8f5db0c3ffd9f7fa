"""`fedrec audit`: verify each region's ledger and every privacy claim made from it.

For each ledger: the hash chain holds and every entry carries the region key's signature (the
key in the region's state folder, and the one pinned with `--key` if given); each recorded
cumulative ε equals a fresh recomputation with the entry's accountant; it is not below an
independent tight computation (Google dp-accounting's PLD) beyond a numerical tolerance (a
looser recorded ε, such as RDP's, is reported as conservative); no entry exceeds its budget.

For each claim (a run folder's privacy.json, a teacher or student checkpoint, a bundle manifest):
it is well formed; its ledger head is an entry of that region's chain and ε, δ, budget,
accountant, run, round and key all equal that entry's; it is the entry of the region's last
update applied in that run (from the run's round records when given, else the region's last
entry for the run); and every region that spent for the run is claimed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.privacy.accountant import opacus_epsilon, pld_epsilon
from fedrec.privacy.claims import RUN_CLAIMS_FILE, ClaimError, PrivacyClaim, RunClaims, parse_claims
from fedrec.privacy.ledger import LEDGER_FILE, Ledger, LedgerEntry, LedgerError, line_hash
from fedrec.privacy.signing import read_public_key
from fedrec.privacy.spend import RunSpend, segments, spend_by_run

# A recorded ε may sit this far below PLD's before it counts as under-counting: PLD is itself a
# discretised estimate, and at small ε a relative rule alone would flag rounding.
PLD_RELATIVE_TOLERANCE = 0.01
PLD_ABSOLUTE_TOLERANCE = 0.005
CLAIM_FILES = (RUN_CLAIMS_FILE, "teacher.json", "student.json", "manifest.json")


@dataclass
class RegionAudit:
    region: str
    ledger: str
    entries: int = 0
    epsilon_per_entry: list[float] = field(default_factory=list)
    epsilon_recorded: float = 0.0
    epsilon_recomputed: float = 0.0
    epsilon_pld: float = 0.0
    conservative_by: float = 0.0        # how far the recorded ε lies above PLD's (a fraction)
    delta: float = 0.0
    budget_epsilon: float = 0.0
    accountant: str = ""
    head: str = ""
    public_key: str = ""
    key_pinned: bool = False
    runs: list[RunSpend] = field(default_factory=list)
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


def audit_ledger(region: str, path: Path, pinned_key: str | None = None) -> tuple[RegionAudit, list[LedgerEntry]]:
    """The region's audit and its verified entries (none when the chain does not verify)."""
    result = RegionAudit(region, str(path))
    try:
        entries = Ledger(path).entries()
    except LedgerError as exc:
        result.problems.append(str(exc))
        return result, []
    if not entries:
        return result, []
    result.public_key = entries[0].public_key
    held = read_public_key(path.parent)
    if held is not None and held != result.public_key:
        result.problems.append(f"the ledger is signed by key {result.public_key[:16]}…, but the region's "
                               f"{path.parent.name}/signing.pub is {held[:16]}… (re-signed by someone else?)")
    if pinned_key is not None:
        result.key_pinned = True
        if pinned_key != result.public_key:
            result.problems.append(f"the ledger is signed by key {result.public_key[:16]}…, not the pinned "
                                   f"key {pinned_key[:16]}…")
    for number, entry in enumerate(entries, start=1):
        recomputed = opacus_epsilon(segments(entries[:number]), entry.delta, entry.accountant)
        result.epsilon_per_entry.append(recomputed)
        if not math.isclose(recomputed, entry.epsilon, rel_tol=1e-6, abs_tol=1e-9):
            result.problems.append(f"entry {number}: recorded ε {entry.epsilon:.6f} but the events give "
                                   f"{recomputed:.6f}")
        if recomputed > entry.budget_epsilon * (1 + 1e-9):
            result.problems.append(f"entry {number}: ε {recomputed:.4f} exceeds the budget {entry.budget_epsilon:g}")
        if entry.region != region:
            result.problems.append(f"entry {number}: names region {entry.region!r}, ledger is {region!r}")
    last = entries[-1]
    result.entries, result.runs = len(entries), spend_by_run(entries)
    result.epsilon_recorded, result.epsilon_recomputed = last.epsilon, result.epsilon_per_entry[-1]
    result.epsilon_pld = pld_epsilon(segments(entries), last.delta)
    result.delta, result.budget_epsilon, result.accountant = last.delta, last.budget_epsilon, last.accountant
    result.head = line_hash(last.line())
    floor = result.epsilon_pld * (1 - PLD_RELATIVE_TOLERANCE) - PLD_ABSOLUTE_TOLERANCE
    if result.epsilon_recorded < floor:
        result.problems.append(f"recorded ε {result.epsilon_recorded:.4f} is below dp-accounting PLD's "
                               f"{result.epsilon_pld:.4f}: the {last.accountant} accountant under-counts")
    result.conservative_by = max(0.0, result.epsilon_recorded / max(result.epsilon_pld, 1e-12) - 1)
    return result, entries


@dataclass
class Found:
    """What lies under the paths given to the audit."""

    ledgers: dict[str, Path] = field(default_factory=dict)
    claim_files: list[Path] = field(default_factory=list)


def find(paths: list[Path]) -> Found:
    found = Found()
    for path in paths:
        if not path.exists():
            raise FedrecError(f"{path} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.is_dir():
                continue
            if file.name == LEDGER_FILE or (path.is_file() and file.suffix == ".jsonl"):
                region = _ledger_region(file)
                if region in found.ledgers and found.ledgers[region] != file:
                    raise FedrecError(f"two ledgers for region {region}: {found.ledgers[region]} and {file}")
                found.ledgers[region] = file
            elif file.name in CLAIM_FILES:
                found.claim_files.append(file)
    return found


def _ledger_region(path: Path) -> str:
    try:
        first = path.read_text().splitlines()[:1]
        return json.loads(first[0])["region"] if first else path.parent.name
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return path.parent.name


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ClaimError(f"{path}: not readable JSON ({exc})") from exc


def read_claims(path: Path) -> tuple[dict[str, PrivacyClaim], RunClaims | None]:
    """The claims in a file, and the record of the run they come from: the file itself when it is
    a run's privacy.json, or the run a teacher checkpoint links ("federated_run"). Checkpoints
    carry claims under "privacy", bundle manifests under "privacy" → "regions". Raises
    ClaimError naming the file when it is malformed."""
    data = _read_json(path)
    if path.name == RUN_CLAIMS_FILE:
        record = RunClaims.parse(data, str(path))
        return record.claims, record
    if not isinstance(data, dict):
        raise ClaimError(f"{path}: must be a JSON object, got {type(data).__name__}")
    claims = data.get("privacy", {})
    if path.name == "manifest.json":
        if not isinstance(claims, dict):
            raise ClaimError(f"{path}: privacy must be an object")
        claims = claims.get("regions", {})
    link = data.get("federated_run")
    run_claims = Path(link) / RUN_CLAIMS_FILE if isinstance(link, str) else None
    record = read_claims(run_claims)[1] if run_claims is not None and run_claims.is_file() else None
    return parse_claims(claims, f"{path}: privacy"), record


def provenance_chain(path: Path) -> list[Path]:
    """Metadata files along bundle → student → teacher, following each "source"/"teacher" link."""
    metadata = ("manifest.json", "student.json", "teacher.json")
    chain: list[Path] = []
    while path is not None and path not in chain:
        meta = path if path.is_file() else next((path / n for n in metadata if (path / n).is_file()), None)
        if meta is None:
            raise FedrecError(f"{path} has none of {', '.join(metadata)}")
        chain.append(meta)
        data = _read_json(meta)
        link = data.get("source") or data.get("teacher") if isinstance(data, dict) else None
        # a bundle names its source by folder name only: look beside the bundle
        linked = Path(link) if isinstance(link, str) and Path(link).is_absolute() else meta.parent.parent / str(link)
        path = linked if isinstance(link, str) and linked.exists() else None
    return chain


class ClaimCheck:
    """Checks claims against verified ledgers and the coordinator's round records."""

    def __init__(self, entries: dict[str, list[LedgerEntry]], applied: dict[str, dict[str, str]]):
        self.entries, self.applied = entries, applied
        self.by_head = {region: {line_hash(e.line()): e for e in mine} for region, mine in entries.items()}

    def expected_head(self, region: str, run: str) -> str | None:
        """The head of the region's last update applied in `run`: from the round records when
        they were given, else the region's last entry for the run (which also counts an update
        written but lost on its way, so a claim can only err high)."""
        if run in self.applied:
            return self.applied[run].get(region)
        mine = [e for e in self.entries.get(region, []) if e.run == run]
        return line_hash(mine[-1].line()) if mine else None

    def problem(self, source: str, region: str, claim: PrivacyClaim) -> str | None:
        if region not in self.entries:
            return f"{source}: no ledger for region {region} was given"
        entry = self.by_head[region].get(claim.ledger_head)
        if entry is None:
            return (f"{source}: region {region}'s claimed ledger head is not in its ledger "
                    "(truncated, replaced or a different ledger)")
        differs = claim.mismatches(entry)
        if differs:
            return f"{source}: region {region}'s claim differs from its ledger entry {entry.index}: " + "; ".join(differs)
        expected = self.expected_head(region, claim.run)
        if expected is None or expected == claim.ledger_head:
            return None
        latest = self.by_head[region].get(expected)
        if latest is None:
            return (f"{source}: region {region}'s last applied update in run {claim.run} came with a ledger "
                    "entry that is not in its ledger (truncated, replaced or a different ledger)")
        if latest.index > entry.index:      # a newer claim than the record only errs high
            return (f"{source}: region {region}'s claim is stale: it names round {claim.round} (ε {claim.epsilon:.4f}) "
                    f"but the region's last applied update in run {claim.run} came with round {latest.round} "
                    f"(ε {latest.epsilon:.4f})")
        return None

    def missing(self, source: str, claims: dict[str, PrivacyClaim]) -> list[str]:
        """Regions that spent for a run this source claims, but that it leaves out."""
        out = []
        for run in sorted({c.run for c in claims.values()}):
            spent = (set(self.applied[run]) if run in self.applied
                     else {r for r, mine in self.entries.items() if any(e.run == run for e in mine)})
            out += [f"{source}: no claim for region {region}, whose update run {run} applied"
                    for region in sorted(spent - set(claims))]
        return out


def audit(paths: list[str | Path], bundle: str | Path | None = None,
          keys: dict[str, str] | None = None) -> AuditReport:
    """`keys` pins regions' public keys (hex), as their privacy officers recorded them."""
    found = find([Path(p) for p in paths])
    files = {f.resolve(): f for f in found.claim_files}
    if bundle is not None:
        chain = provenance_chain(Path(bundle))
        for meta in chain:                              # a claim is checked once
            files.setdefault(meta.resolve(), meta)
    if not found.ledgers:
        raise FedrecError("no ledger found", hint=f"Pass region state folders or {LEDGER_FILE} files.")
    unknown = sorted(set(keys or {}) - set(found.ledgers))
    if unknown:
        raise FedrecError(f"--key names region(s) {', '.join(unknown)} but no ledger for them was given")
    report = AuditReport({})
    entries = {}
    for region, path in sorted(found.ledgers.items()):
        report.regions[region], entries[region] = audit_ledger(region, path, (keys or {}).get(region))

    claim_sets: list[tuple[str, dict[str, PrivacyClaim]]] = []
    applied: dict[str, dict[str, str]] = {}        # run → region → head of its last applied update
    for file in files.values():
        try:
            claims, record = read_claims(file)
        except ClaimError as exc:
            report.problems.append(str(exc))
            report.claims_checked.append({"source": str(file), "ok": False, "problem": str(exc)})
            continue
        if claims:
            claim_sets.append((str(file), claims))
        if record is not None:
            applied[record.run_id] = record.last_applied()
    if bundle is not None and not claim_sets and not report.problems:
        raise FedrecError(f"{bundle} carries no privacy claim",
                          hint="Pass a bundle, a student or a teacher checkpoint made from a DP run.")
    check = ClaimCheck(entries, applied)
    for source, claims in claim_sets:
        for region, claim in claims.items():
            problem = check.problem(source, region, claim)
            report.claims_checked.append({"source": source, "region": region, "epsilon": claim.epsilon,
                                          "run": claim.run, "round": claim.round,
                                          "ledger_head": claim.ledger_head, "ok": problem is None,
                                          **({"problem": problem} if problem else {})})
            if problem:
                report.problems.append(problem)
        report.problems += check.missing(source, claims)
    return report


def format_audit(report: AuditReport) -> str:
    header = (f"{'region':<8}{'entries':>8}{'ε recorded':>12}{'ε PLD':>9}{'δ':>9}{'budget':>8}"
              f"{'accountant':>11}  status")
    lines = [header, "-" * len(header)]
    for region, r in report.regions.items():
        lines.append(f"{region:<8}{r.entries:>8}{r.epsilon_recorded:>12.3f}{r.epsilon_pld:>9.3f}{r.delta:>9.1e}"
                     f"{r.budget_epsilon:>8g}{r.accountant:>11}  " + ("ok" if r.ok else "FAIL"))
        if r.public_key:
            lines.append(f"    signed by key {r.public_key} "
                         + ("(pinned)" if r.key_pinned else "(not pinned: compare with the region's "
                                                            "`fedrec privacy status`, or pass --key)"))
        if r.conservative_by > PLD_RELATIVE_TOLERANCE:
            lines.append(f"    recorded ε is conservative: {r.conservative_by:.1%} above PLD's")
        lines += [f"    run {s.run}: {s.entries} entries, ε {s.epsilon_alone:.3f} on its own, "
                  f"cumulative {s.epsilon_after:.3f} after it" for s in r.runs]
        lines += [f"    ✗ {p}" for p in r.problems]
    for check in report.claims_checked:
        if "region" not in check:
            continue
        mark = "✓" if check["ok"] else "✗"
        lines.append(f"{mark} claim {check['region']} ε={check['epsilon']:.3f} (run {check['run']} round "
                     f"{check['round']}) from {check['source']}" + ("" if check["ok"] else f": {check['problem']}"))
    claimed = {c.get("problem") for c in report.claims_checked if "region" in c}
    lines += [f"✗ {p}" for p in report.problems if p not in claimed]
    lines.append("audit passed" if report.ok else "audit FAILED")
    return "\n".join(lines)


def write_html(report: AuditReport, path: str | Path) -> None:
    """A self-contained page: the table and a plot of cumulative ε per ledger entry against each budget."""
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
        ax.plot(range(1, r.entries + 1), r.epsilon_per_entry, marker="o", color=color, label=f"{region} ε")
        if r.budget_epsilon:
            ax.axhline(r.budget_epsilon, color=color, linestyle="--", linewidth=1, label=f"{region} budget")
    ax.set_xlabel("ledger entry (one per released update, across runs)")
    ax.set_ylabel("cumulative ε")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    body = (f"<h1>fedrec privacy audit: {'passed' if report.ok else 'FAILED'}</h1>"
            f"<pre>{html.escape(format_audit(report))}</pre>"
            f"<img alt='cumulative epsilon per ledger entry' src='data:image/png;base64,{image}'>")
    with atomic_file(path) as handle:
        handle.write(f"<!doctype html><meta charset='utf-8'><title>fedrec audit</title>{body}\n")
