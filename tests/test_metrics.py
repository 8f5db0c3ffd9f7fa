"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.evaluation.metrics import first_rank, rank_metrics


def test_single_user_hand_computed():
    # items 0..5; order by score: 4, 2, 0, 5, 1, 3  → targets {2, 5} sit at ranks 2 and 4
    scores = np.array([[0.7, 0.2, 0.8, 0.1, 0.9, 0.3]])
    m = rank_metrics(scores, [np.array([2, 5])], [np.array([], dtype=int)], ks=(1, 3))
    assert m["recall@1"][0] == 0.0
    assert m["recall@3"][0] == pytest.approx(1 / 2)
    assert m["ndcg@3"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["mrr"][0] == pytest.approx(1 / 2)


def test_exclusion_moves_targets_up_and_recall_uses_min_k():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    m = rank_metrics(scores, [np.array([2])], [np.array([0, 1])], ks=(1, 2))
    assert m["recall@1"][0] == 1.0 and m["ndcg@1"][0] == 1.0 and m["mrr"][0] == 1.0
    # a basket larger than k: recall is hits ÷ k
    m = rank_metrics(np.array([[4.0, 3.0, 2.0, 1.0]]), [np.array([0, 2, 3])], [np.array([], dtype=int)], ks=(2,))
    assert m["recall@2"][0] == pytest.approx(1 / 2)
    assert m["ndcg@2"][0] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_ties_break_by_item_index_consistently():
    scores = np.zeros(5)
    assert first_rank(scores, np.array([3])) == 4
    m = rank_metrics(scores[None, :], [np.array([3])], [np.array([1])], ks=(3,))
    assert m["recall@3"][0] == 1.0 and m["mrr"][0] == pytest.approx(1 / 3)


def test_several_users_are_independent():
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    m = rank_metrics(scores, [np.array([0]), np.array([0])], [np.array([], dtype=int)] * 2, ks=(1,))
    assert list(m["recall@1"]) == [1.0, 0.0]
    assert list(m["mrr"]) == [1.0, pytest.approx(1 / 3)]
