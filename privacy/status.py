"""`fedrec privacy status`: what a region's data has spent over its lifetime, run by run, and the
key that signs its ledger (for the privacy officer to pin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.privacy.ledger import LEDGER_FILE, Ledger
from fedrec.privacy.signing import read_public_key
from fedrec.privacy.spend import RunSpend, spend_by_run


@dataclass
class RegionStatus:
    state_dir: str
    region: str
    entries: int
    lifetime_epsilon: float
    delta: float
    budget_epsilon: float
    accountant: str
    public_key: str | None
    runs: list[RunSpend] = field(default_factory=list)


def region_status(state_dir: str | Path) -> RegionStatus:
    """The status of the region whose state folder (or ledger file) this is; the ledger is verified."""
    path = Path(state_dir)
    ledger = Ledger(path if path.is_file() else path / LEDGER_FILE)
    if not ledger.path.is_file():
        raise FedrecError(f"{ledger.path} does not exist: no spend recorded here",
                          hint="Pass a region's state folder (default DATA/<region>/.fedrec).")
    entries = ledger.entries()
    if not entries:
        return RegionStatus(str(ledger.path.parent), ledger.path.parent.name, 0, 0.0, 0.0, 0.0, "",
                            read_public_key(ledger.path.parent))
    last = entries[-1]
    return RegionStatus(str(ledger.path.parent), last.region, len(entries), last.epsilon, last.delta,
                        last.budget_epsilon, last.accountant, last.public_key, spend_by_run(entries))


def format_status(status: RegionStatus) -> str:
    lines = [f"region {status.region} ({status.state_dir}): {status.entries} ledger entries",
             f"  lifetime ε {status.lifetime_epsilon:.3f} of budget {status.budget_epsilon:g} at δ {status.delta:g}"
             f" ({status.accountant or 'no spend yet'}); left {max(status.budget_epsilon - status.lifetime_epsilon, 0):.3f}",
             f"  signing key {status.public_key or '(none yet: created at the first spend)'}"]
    lines += [f"  run {s.run}: rounds {', '.join(map(str, s.rounds))}; ε {s.epsilon_alone:.3f} on its own, "
              f"lifetime {s.epsilon_after:.3f} after it" for s in status.runs]
    return "\n".join(lines)
