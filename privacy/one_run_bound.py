"""The lower bound on ε of a one-run audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with
one (1) training run", arXiv 2305.08846), for (ε, δ)-DP.

m canaries are each included by an independent fair coin; the auditor guesses r of them (in or
out) and v guesses are right. If the training is (ε, δ)-DP, v is stochastically dominated by
Binomial(r, e^ε / (1 + e^ε)) up to a δ term, so

    P[V ≥ v] ≤ P[Binomial(r, q) ≥ v] + 2·m·δ · max_{1≤i≤v} P[v > Binomial(r, q) ≥ v − i] / i,
    q = e^ε / (1 + e^ε)

(the paper's approximate-DP theorem, computed as in its appendix). The lower bound at confidence
1 − β is the largest ε whose p-value for the observed v is still below β: any smaller ε is
rejected, so a training that is ε'-DP with ε' below the bound would have produced this many right
guesses with probability under β.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.stats import binom

from fedrec.errors import FedrecError

EPSILON_CEILING = 100.0     # no bound above this is searched for (q is 1 to double precision)


def check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise FedrecError(f"a one-run audit needs 0 ≤ correct ≤ guesses ≤ canaries; got {correct} correct of "
                          f"{guesses} guesses on {canaries} canaries")


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, were the training (ε, δ)-DP, of `correct` or more right guesses."""
    check_counts(canaries, guesses, correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise FedrecError(f"need ε ≥ 0 and 0 ≤ δ ≤ 1, got ε={epsilon}, δ={delta}")
    q = 1 / (1 + math.exp(-epsilon))        # the accuracy of ε-DP randomised response
    tail = float(binom.sf(correct - 1, guesses, q))
    below, worst = 0.0, 0.0                 # P[correct > Binomial ≥ correct − i], its worst ratio to i
    for i in range(1, correct + 1):
        below += float(binom.pmf(correct - i, guesses, q))
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * canaries * delta * worst)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest ε rejected at `confidence`: 0 when even ε = 0 explains the guesses."""
    if not 0 < confidence < 1:
        raise FedrecError(f"confidence must lie in (0, 1), got {confidence}")
    beta = 1 - confidence

    def excess(epsilon: float) -> float:
        return p_value(canaries, guesses, correct, epsilon, delta) - beta

    if excess(0.0) >= 0:
        return 0.0
    if excess(EPSILON_CEILING) < 0:
        return EPSILON_CEILING
    return float(brentq(excess, 0.0, EPSILON_CEILING, xtol=1e-6))


def bound_ceiling(canaries: int, guesses: int, delta: float, confidence: float = 0.95) -> float:
    """The most this audit could show: the bound when every guess is right."""
    return epsilon_lower_bound(canaries, guesses, guesses, delta, confidence)
