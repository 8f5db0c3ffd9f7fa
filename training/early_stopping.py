"""Keep the best state seen so far and say when validation stopped improving."""

from __future__ import annotations

from typing import Any, Callable


class EarlyStopping:
    def __init__(self, patience: int):
        self.patience, self.waited = patience, 0
        self.best_score, self.best_epoch, self.best_state = float("-inf"), 0, None

    def update(self, epoch: int, score: float, snapshot: Callable[[], Any]) -> bool:
        """Record an epoch's score; returns True when it is the best so far (and snapshots it)."""
        if score > self.best_score:
            self.best_score, self.best_epoch, self.best_state, self.waited = score, epoch, snapshot(), 0
            return True
        self.waited += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.waited >= self.patience
