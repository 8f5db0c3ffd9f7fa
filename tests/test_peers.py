"""The non-private peers (EASE, ItemKNN) against a four-item example worked out by hand.

Every expected value below is written from the paper formulas, not from the library helpers,
so a slip in the pooled matrix, the regularisation, the pruning or the age weighting shows up.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.data.silo import Catalog, Silo, UserRecord
from fedrec.evaluation.rankers import (EASE, EvalCase, ItemKNN, gram_matrix, interaction_matrix,
                                       weighted_histories)

ITEMS = 4


@pytest.fixture
def silos() -> dict[str, Silo]:
    """Two regions sharing a catalog. Only the first n_train baskets of a user may count: the held-out
    baskets (u1's [3] and [2, 3], u2's [1], u3's [0]) would change the matrix if they leaked in."""
    catalog = Catalog([f"i{i}" for i in range(ITEMS)], [f"item {i}" for i in range(ITEMS)], [""] * ITEMS)
    b = lambda *items: np.array(items, dtype=np.int64)   # noqa: E731 – a basket
    region_a = [UserRecord("u1", [b(0, 1), b(1, 2), b(3), b(2, 3)], [""] * 4, n_train=2),
                UserRecord("u2", [b(0), b(2, 3), b(1)], [""] * 3, n_train=2)]
    region_b = [UserRecord("u3", [b(1, 2), b(0)], [""] * 2, n_train=1),
                UserRecord("u4", [b(0, 3)], [""], n_train=1)]
    return {"a": Silo("a", catalog, region_a), "b": Silo("b", catalog, region_b)}


# Users × items, binary: u1 bought item 1 in two training baskets, which still counts once.
X = np.array([[1, 1, 1, 0],     # u1: {0, 1, 2}
              [1, 0, 1, 1],     # u2: {0, 2, 3}
              [0, 1, 1, 0],     # u3: {1, 2}
              [1, 0, 0, 1]],    # u4: {0, 3}
             dtype=float)
# XᵀX by counting co-buyers: diagonal = buyers of the item.
G = np.array([[3, 1, 2, 2],
              [1, 2, 2, 0],
              [2, 2, 3, 1],
              [2, 0, 1, 2]], dtype=float)


def u1_test_case(silos) -> EvalCase:
    """u1 at test time: history [3] (age 0), [1, 2] (age 1), [0, 1] (age 2), newest first."""
    return EvalCase(*silos["a"].users[0].eval_case("test"))


# u1's age-weighted history, 0.8 ** age of each item's newest occurrence (item 1: age 1, not 2).
H_U1 = np.array([0.8 ** 2, 0.8, 0.8, 1.0])


def test_interaction_and_gram_matrix(silos):
    np.testing.assert_array_equal(interaction_matrix(silos).toarray(), X)
    np.testing.assert_array_equal(X.T @ X, G)     # the hand count above is right
    np.testing.assert_array_equal(gram_matrix(silos), G)


def test_age_weighted_history(silos):
    case = u1_test_case(silos)
    np.testing.assert_array_equal(case.history, [3, 1, 2, 0, 1])
    np.testing.assert_array_equal(case.ages, [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(case.targets, [2, 3])
    np.testing.assert_allclose(weighted_histories([case], ITEMS), [H_U1])


def ease_by_formula(gram: np.ndarray, l2: float) -> np.ndarray:
    """Steck (2019), eq. 8: B_ij = −P_ij / P_jj off the diagonal, 0 on it, P = (G + λI)⁻¹."""
    precision = np.linalg.inv(gram + l2 * np.eye(len(gram)))
    weights = np.zeros_like(gram)
    for i in range(len(gram)):
        for j in range(len(gram)):
            if i != j:
                weights[i, j] = -precision[i, j] / precision[j, j]
    return weights


@pytest.mark.parametrize("l2", [0.5, 3.0])
def test_ease_weights_and_scores(silos, l2):
    expected = ease_by_formula(G, l2)
    # The closed form must equal the constrained ridge regression it solves: column j regresses
    # item j on every other item, min ‖X_j − X_{−j} b‖² + λ‖b‖².
    for j in range(ITEMS):
        others = [i for i in range(ITEMS) if i != j]
        ridge = np.linalg.solve(X[:, others].T @ X[:, others] + l2 * np.eye(ITEMS - 1), X[:, others].T @ X[:, j])
        np.testing.assert_allclose(expected[others, j], ridge, rtol=1e-10)

    ease = EASE.fit(silos, l2=l2)
    np.testing.assert_allclose(ease.similarity, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ease.score("a", [u1_test_case(silos)]), [H_U1 @ expected], rtol=1e-10)


r = 1 / (np.sqrt(6) + 1)   # shrunk cosine of two items with 1 co-buyer and 3 and 2 buyers, shrink 1
# S_ij = G_ij / (√G_ii·√G_jj + 1): e.g. S_02 = 2 / (√3·√3 + 1) = 1/2, S_03 = 2 / (√3·√2 + 1) = 2r.
KNN_FULL = np.array([[0,     r,     1 / 2, 2 * r],
                     [r,     0,     2 * r, 0],
                     [1 / 2, 2 * r, 0,     r],
                     [2 * r, 0,     r,     0]])
# Two neighbours per item (column): column 0 keeps items 3 and 2 (2r > 1/2 > r) and drops item 1;
# column 2 keeps items 1 and 0 (2r > 1/2 > r) and drops item 3; columns 1 and 3 lose only a zero.
KNN_TOP2 = np.array([[0,     r,     1 / 2, 2 * r],
                     [0,     0,     2 * r, 0],
                     [1 / 2, 2 * r, 0,     r],
                     [2 * r, 0,     0,     0]])


@pytest.mark.parametrize("neighbours, expected", [(100, KNN_FULL), (2, KNN_TOP2)])
def test_item_knn_similarity_and_scores(silos, neighbours, expected):
    knn = ItemKNN(silos, neighbours=neighbours, shrink=1.0)
    np.testing.assert_allclose(knn.similarity, expected, rtol=1e-12)
    np.testing.assert_allclose(knn.score("a", [u1_test_case(silos)]), [H_U1 @ expected], rtol=1e-12)


def test_item_knn_scores_written_out(silos):
    """u1's top-2 ItemKNN scores, item by item: Σ_i h_i S_ij."""
    h0, h1, h2, h3 = H_U1
    expected = [h2 / 2 + h3 * 2 * r, h0 * r + h2 * 2 * r, h0 / 2 + h1 * 2 * r, h0 * 2 * r + h2 * r]
    knn = ItemKNN(silos, neighbours=2, shrink=1.0)
    np.testing.assert_allclose(knn.score("a", [u1_test_case(silos)])[0], expected, rtol=1e-12)


def test_ease_tuned_picks_best_validation_lambda(silos):
    validation = {1.0: 0.20, 10.0: 0.70, 100.0: 0.40}
    seen = []

    def validation_ndcg(candidate: EASE) -> float:
        seen.append(candidate.l2)
        np.testing.assert_allclose(candidate.similarity, ease_by_formula(G, candidate.l2), atol=1e-12)
        return validation[candidate.l2]

    best = EASE.tuned(silos, validation_ndcg, l2_grid=tuple(validation))
    assert seen == [1.0, 10.0, 100.0]
    assert best.l2 == 10.0
    np.testing.assert_allclose(best.similarity, ease_by_formula(G, 10.0), atol=1e-12)


def test_ease_tuned_without_validation_users_still_returns_a_model(silos):
    """No validation users gives a NaN score for every λ; the first λ of the grid is kept."""
    best = EASE.tuned(silos, lambda candidate: float("nan"), l2_grid=(30.0, 300.0))
    assert best is not None and best.l2 == 30.0
