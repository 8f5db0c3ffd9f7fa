"""An append-only, hash-chained, signed privacy ledger: one JSON line per release of a region's update.

Each entry carries everything needed to recompute ε (steps, sample rate, σ, C, δ, accountant),
the SHA-256 of the previous line, and the region's Ed25519 signature over all of it. The chain
makes an edited, reordered or truncated ledger fail; the signature makes a rewritten and
re-chained one fail, since only the region holds the key. One key signs a whole ledger.
An entry is fsync'd before the update it accounts for may leave the region.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import fedrec
from fedrec.atomic import atomic_file, fsync_dir, write_failed
from fedrec.errors import FedrecError
from fedrec.privacy.signing import SigningKey, verify_signature

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
REPAIR_LOCK_WAIT = 30.0     # seconds a repair waits for a running round before it gives up


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
    public_key: str             # the region's Ed25519 key (hex) that signed this entry
    signature: str = ""         # over `signed_bytes()`: every other field

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def signed_bytes(self) -> bytes:
        fields = asdict(self)
        del fields["signature"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


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
        try:
            text = self.path.read_text() if self.path.exists() else ""
        except UnicodeDecodeError as exc:
            raise LedgerError(f"{self.path}: not UTF-8 text ({exc})") from exc
        if text and not text.endswith("\n"):
            raise LedgerError(f"{self.path}: the last entry is incomplete (its write was cut off)",
                              hint=f"`fedrec privacy repair-ledger {self.path}` cuts off a torn last entry and "
                                   "verifies the rest; the update it was written for never left the region")
        return self._verified(text.splitlines())

    def _verified(self, lines: list[str]) -> list[LedgerEntry]:
        entries, prev = [], GENESIS
        for number, line in enumerate(lines, start=1):
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
            if entries and entry.public_key != entries[0].public_key:
                raise LedgerError(f"{self.path}: entry {number} is signed by another key than entry 1")
            if not verify_signature(entry.public_key, entry.signed_bytes(), entry.signature):
                raise LedgerError(f"{self.path}: entry {number} does not carry a valid signature of its "
                                  "region's key (forged or edited)")
            entries.append(entry)
            prev = line_hash(line)
        return entries

    def head(self) -> str:
        """SHA-256 of the last line (GENESIS for an empty ledger): what claims point at."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return line_hash(lines[-1]) if lines else GENESIS

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive across processes: one spend at a time sees and extends the same history.
        With a `timeout` (seconds), a LedgerError naming the holding process ends the wait.
        Not re-entrant: a holder that asks again waits for itself."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+")
        except OSError as exc:
            raise write_failed(lock_path, exc) from exc
        with handle:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        try:
                            holder = lock_path.read_text().strip() or "unknown"
                        except (OSError, UnicodeDecodeError):
                            holder = "unknown"
                        raise LedgerError(
                            f"{self.path} is still locked by another round (last recorded holder: process "
                            f"{holder}) after {timeout:g}s", hint="That round may hang; nothing was spent by "
                            "this one. Stop the holding process if it is stuck.") from None
                    time.sleep(0.05)
            handle.truncate(0)                          # who holds it, for the message above
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def repair(self) -> str:
        """Cut off a torn last entry, the trace of a process killed inside `append`'s write, and say
        what was done. Only that: any other damage is left for `fedrec audit` to report.

        Cutting it under-counts nothing: `append` returns only once the whole line is synced, and
        the update is released only after that, so a torn entry's update never left the region.
        A last entry that is whole but lacks its newline is kept (the newline is added); one that
        parses but does not follow the chain is not a torn write and is refused like other damage."""
        with self.lock(timeout=REPAIR_LOCK_WAIT):
            data = self.path.read_bytes() if self.path.exists() else b""
            if not data or data.endswith(b"\n"):
                return f"{self.path}: intact, {len(self.entries())} entries; nothing to repair"
            cut = data.rfind(b"\n") + 1
            try:
                entries = self._verified(data[:cut].decode().splitlines())   # raises on any other damage
            except UnicodeDecodeError as exc:
                raise LedgerError(f"{self.path}: not UTF-8 text before its last line ({exc})") from exc
            tail = data[cut:]
            try:
                json.loads(tail)
            except ValueError:
                whole = False                                   # torn: a cut line never parses
            else:
                self._verified(data.decode().splitlines())     # complete: it must verify, else refused
                whole = True
            try:
                with open(self.path, "r+b") as handle:
                    if whole:
                        handle.seek(0, os.SEEK_END)
                        handle.write(b"\n")
                    else:
                        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                        kept = self.path.with_name(f"{self.path.name}.torn-{stamp}")
                        with atomic_file(kept, "wb") as out:
                            out.write(tail)
                        handle.truncate(cut)
                    handle.flush()
                    os.fsync(handle.fileno())
                fsync_dir(self.path.parent)
            except OSError as exc:
                raise write_failed(self.path, exc) from exc
            if whole:
                return f"{self.path}: the last entry was whole but had no newline; added it ({len(entries) + 1} entries)"
            return (f"{self.path}: cut off a torn last entry of {len(tail)} bytes (kept in {kept.name}); "
                    f"{len(entries)} entries verify")

    def append(self, key: SigningKey, **fields) -> LedgerEntry:
        """Verify, append one entry signed with `key`, and fsync file and folder before returning."""
        entries = self.entries()
        if entries and entries[0].public_key != key.public_hex:
            raise LedgerError(f"{self.path} is signed by key {entries[0].public_key[:16]}…, not this region's "
                              f"key {key.public_hex[:16]}…", hint="Restore the region's signing.key from its backup.")
        unsigned = LedgerEntry(index=len(entries) + 1, fedrec_version=fedrec.__version__,
                               prev_sha256=self.head(), public_key=key.public_hex, **fields)
        entry = replace(unsigned, signature=key.sign(unsigned.signed_bytes()))
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
