"""Differential privacy per region: user-level DP-SGD, a region-owned budget, a hash-chained
ledger of every spend, and the audit that recomputes each ε from the ledger alone."""
