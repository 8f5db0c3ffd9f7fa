"""A privacy claim: what a model says about one region's spend, pointing at the ledger entry its
last applied update came with. The coordinator builds claims from what regions send; run
folders, checkpoints and bundle manifests carry them; `fedrec audit` checks each one field by
field against that entry."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from fedrec.errors import FedrecError
from fedrec.privacy.ledger import LedgerEntry, line_hash


KINDS = {"float": (float, "a finite number"), "int": (int, "a whole number"), "str": (str, "a string")}
CLAIM_SCHEMA = 1        # written in every claim; a claim without it predates the field and is version 1


class ClaimError(FedrecError):
    """A claim file or claim that is not what a claim must be; the message names where."""


@dataclass(frozen=True)
class PrivacyClaim:
    epsilon: float              # the region's cumulative ε at that entry
    delta: float
    budget_epsilon: float
    accountant: str
    run: str                    # the run and round of the entry
    round: int
    ledger_head: str            # SHA-256 of the entry's ledger line
    public_key: str             # the region key that signed it

    @classmethod
    def of_entry(cls, entry: LedgerEntry) -> "PrivacyClaim":
        return cls(entry.epsilon, entry.delta, entry.budget_epsilon, entry.accountant, entry.run,
                   entry.round, line_hash(entry.line()), entry.public_key)

    def to_json(self) -> dict:
        return {"schema": CLAIM_SCHEMA, **asdict(self)}

    @classmethod
    def parse(cls, value: object, where: str) -> "PrivacyClaim":
        """From JSON, with every field present and of its type; `where` names it in errors."""
        if not isinstance(value, dict):
            raise ClaimError(f"{where}: a claim must be an object, got {type(value).__name__}")
        if value.get("schema", CLAIM_SCHEMA) != CLAIM_SCHEMA:
            raise ClaimError(f"{where}: claim schema {value['schema']!r}, this fedrec reads {CLAIM_SCHEMA}",
                             hint="Audit it with the fedrec version that wrote it.")
        values = {}
        for field in fields(cls):
            kind, what = KINDS[field.type]
            item = value.get(field.name)
            ok = isinstance(item, kind) or (kind is float and isinstance(item, int))
            if isinstance(item, bool) or not ok or (kind is float and not math.isfinite(item)):
                raise ClaimError(f"{where}: {field.name} must be {what}, got {item!r:.80}")
            values[field.name] = kind(item)
        return cls(**values)

    def mismatches(self, entry: LedgerEntry) -> list[str]:
        """The fields in which this claim differs from the ledger entry it points at."""
        return [f"{name} {mine!r} (ledger: {theirs!r})" for name, mine, theirs in (
            ("epsilon", self.epsilon, entry.epsilon), ("delta", self.delta, entry.delta),
            ("budget_epsilon", self.budget_epsilon, entry.budget_epsilon),
            ("accountant", self.accountant, entry.accountant), ("run", self.run, entry.run),
            ("round", self.round, entry.round), ("public_key", self.public_key, entry.public_key))
            if mine != theirs]


def parse_claims(value: object, where: str) -> dict[str, PrivacyClaim]:
    """{region: claim} as run folders and checkpoints store it."""
    if not isinstance(value, dict):
        raise ClaimError(f"{where}: claims must be an object {{region: claim}}, got {type(value).__name__}")
    return {str(region): PrivacyClaim.parse(claim, f"{where}: region {region}") for region, claim in value.items()}


def claims_to_json(claims: dict[str, PrivacyClaim]) -> dict[str, dict]:
    """What `parse_claims` reads."""
    return {region: claim.to_json() for region, claim in claims.items()}


RUN_CLAIMS_FILE = "privacy.json"


@dataclass
class RunClaims:
    """A federated run's privacy record (RUN/privacy.json): per region the claim for its last
    applied update, and per round the ledger head each applied update came with."""

    run_id: str
    claims: dict[str, PrivacyClaim]
    applied: dict[int, dict[str, str]]      # round → region → ledger head

    def add_round(self, server_round: int, claims: dict[str, PrivacyClaim]) -> None:
        self.claims.update(claims)
        self.applied[server_round] = {region: claim.ledger_head for region, claim in claims.items()}

    def last_applied(self) -> dict[str, str]:
        """Per region, the head of its last applied update."""
        heads: dict[str, str] = {}
        for server_round in sorted(self.applied):
            heads.update(self.applied[server_round])
        return heads

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "claims": claims_to_json(self.claims),
                "applied": {str(n): heads for n, heads in sorted(self.applied.items())}}

    @classmethod
    def parse(cls, value: object, where: str) -> "RunClaims":
        if not isinstance(value, dict) or not isinstance(value.get("run_id"), str):
            raise ClaimError(f"{where}: must be an object with run_id, claims and applied")
        applied = value.get("applied")
        if not isinstance(applied, dict) or not all(
                str(n).isdigit() and isinstance(heads, dict) and all(isinstance(h, str) for h in heads.values())
                for n, heads in applied.items()):
            raise ClaimError(f"{where}: applied must map each round to {{region: ledger head}}")
        return cls(value["run_id"], parse_claims(value.get("claims"), f"{where}: claims"),
                   {int(n): dict(heads) for n, heads in applied.items()})
