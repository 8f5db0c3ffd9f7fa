"""An append-only, hash-chained privacy ledger: one JSON line per release of a region's update.

Each entry carries everything needed to recompute ε (steps, sample rate, σ, C, δ, accountant)
and the SHA-256 of the previous line, so an edited, reordered or truncated ledger no longer
verifies. An entry is fsync'd before the update it accounts for may leave the region.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import fedrec
from fedrec.atomic import fsync_dir, write_failed
from fedrec.errors import FedrecError

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"


@dataclass(frozen=True)
class LedgerEntry:
    index: int
    region: str
    run: str                    # the federation run that received the update
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float     # σ
    max_grad_norm: float        # C
    users: int
    delta: float
    epsilon: float              # cumulative ε of the region after this entry
    budget_epsilon: float
    accountant: str
    fedrec_version: str
    time: str
    prev_sha256: str

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


class LedgerError(FedrecError):
    """The ledger does not verify; names the entry (1-based line) that breaks it."""


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


class Ledger:
    """A region's ledger file. Reading always verifies the whole chain."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def entries(self) -> list[LedgerEntry]:
        """All entries, verified: each must name the hash of the line before it."""
        if not self.path.exists():
            return []
        entries, prev = [], GENESIS
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                entry = LedgerEntry(**json.loads(line))
            except (ValueError, TypeError) as exc:
                raise LedgerError(f"{self.path}: entry {number} is not a valid ledger entry ({exc})") from exc
            if entry.prev_sha256 != prev:
                raise LedgerError(f"{self.path}: entry {number} does not follow entry {number - 1} "
                                  "(hash chain broken: edited, reordered or removed entries)")
            if entry.index != number:
                raise LedgerError(f"{self.path}: entry {number} carries index {entry.index}")
            if entry.line() != line:
                raise LedgerError(f"{self.path}: entry {number} is not in canonical form (edited?)")
            entries.append(entry)
            prev = line_hash(line)
        return entries

    def head(self) -> str:
        """SHA-256 of the last line (GENESIS for an empty ledger): what claims point at."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return line_hash(lines[-1]) if lines else GENESIS

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes: one spend at a time sees and extends the same history."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")
        except OSError as exc:
            raise write_failed(lock_path, exc) from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, **fields) -> LedgerEntry:
        """Verify, append one entry, and fsync file and folder before returning."""
        entries = self.entries()
        entry = LedgerEntry(index=len(entries) + 1, fedrec_version=fedrec.__version__,
                            prev_sha256=self.head(), **fields)
        line = (entry.line() + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_failed(self.path, exc) from exc
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write (disk full?)")
            os.fsync(fd)
            fsync_dir(self.path.parent)
        except OSError as exc:
            os.ftruncate(fd, size)        # never leave half an entry: the chain stays verifiable
            raise write_failed(self.path, exc) from exc
        finally:
            os.close(fd)
        return entry
