"""A region's privacy budget, set by the region's operator and never by the server."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedrec.errors import FedrecError
from fedrec.privacy.accountant import check_accountant


@dataclass(frozen=True)
class RegionBudget:
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0          # C: each user's clipped gradient norm
    noise_multiplier: float = 0.0       # σ; 0 = derive from ε for the planned rounds
    accountant: str = "prv"
    enabled: bool = True                # False only when the region asked for --no-dp

    def node_config(self) -> dict:
        """The budget as the region's SuperNode carries it (`from_node_config` reads it back)."""
        return {"dp": self.enabled, "epsilon": self.epsilon, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
                "noise_multiplier": self.noise_multiplier, "accountant": self.accountant}

    @classmethod
    def from_node_config(cls, node_config: dict) -> "RegionBudget":
        def number(key: str, default: float) -> float:
            try:
                return float(node_config.get(key, default))
            except (TypeError, ValueError):
                raise FedrecError(f"node config {key}={node_config.get(key)!r} is not a number") from None

        budget = cls(epsilon=number("epsilon", cls.epsilon), delta=number("delta", cls.delta),
                     max_grad_norm=number("max_grad_norm", cls.max_grad_norm),
                     noise_multiplier=number("noise_multiplier", cls.noise_multiplier),
                     accountant=str(node_config.get("accountant", cls.accountant)),
                     enabled=str(node_config.get("dp", "true")).lower() not in ("false", "0", "no", "off"))
        budget.validate()
        return budget

    def validate(self, users: int | None = None) -> None:
        check_accountant(self.accountant)
        if not self.enabled:
            return
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise FedrecError(f"ε must be a positive number, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise FedrecError(f"δ must lie in (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0 or self.noise_multiplier < 0:
            raise FedrecError("max_grad_norm must be > 0 and noise_multiplier ≥ 0")
        if users is not None and self.delta >= 1 / users:
            raise FedrecError(f"δ={self.delta:g} is not below 1/users = 1/{users} = {1 / users:.3g}: "
                              "a mechanism could then reveal a whole user's data outright",
                              hint=f"Choose δ < {1 / users:.3g} (commonly ≤ 1/(10·users)).")
