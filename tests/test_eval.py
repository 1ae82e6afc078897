"""Hungarian clustering accuracy, and the agreement of two heads, against brute force over all
cluster-to-class permutations."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from evaluation.accuracy import (branch_agreement, log_accs_from_preds, split_cluster_acc_v2,
                                       split_cluster_acc_v2_balanced)


def brute_force(y_true, y_pred, mask):
    """Every optimal one-to-one map of cluster ids to class ids, by enumeration.

    Returns (best matched count, list of (all, old, new, balanced all, balanced old, balanced new)
    for each optimal permutation), all computed with explicit loops.
    """
    size = max(max(y_true), max(y_pred)) + 1
    results, best = [], -1
    for perm in itertools.permutations(range(size)):
        hits = [perm[p] == t for p, t in zip(y_pred, y_true)]
        count = sum(hits)
        if count < best:
            continue
        if count > best:
            best, results = count, []
        results.append(_accuracies(y_true, hits, mask))
    return best, results


def _accuracies(y_true, hits, mask):
    def share(rows):
        return sum(hits[i] for i in rows) / len(rows) if rows else 0.0

    rows = range(len(y_true))
    old_rows = [i for i in rows if mask[i]]
    new_rows = [i for i in rows if not mask[i]]
    per_class = {c: share([i for i in rows if y_true[i] == c]) for c in set(y_true)}

    def balanced(classes):
        return sum(per_class[c] for c in classes) / len(classes) if classes else 0.0

    old_classes = {y_true[i] for i in old_rows}
    new_classes = {y_true[i] for i in new_rows}
    return (share(list(rows)), share(old_rows), share(new_rows),
            balanced(set(y_true)), balanced(old_classes), balanced(new_classes))


def random_case(rng, num_classes, num_clusters, num_old, n):
    y_true = rng.randint(0, num_classes, size=n)
    # Mostly consistent clusters with noise, so that the optimum is meaningful.
    y_pred = np.where(rng.rand(n) < 0.6, (y_true * 7 + 3) % num_clusters, rng.randint(0, num_clusters, size=n))
    return y_true, y_pred, y_true < num_old


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("num_clusters_offset", [-2, 0, 2])
def test_v2_matches_brute_force(seed, num_clusters_offset):
    rng = np.random.RandomState(seed)
    num_classes = 3 + seed % 3
    num_clusters = max(1, num_classes + num_clusters_offset)
    y_true, y_pred, mask = random_case(rng, num_classes, num_clusters, num_old=num_classes // 2, n=40)
    best, optimal = brute_force(y_true.tolist(), y_pred.tolist(), mask.tolist())
    all_acc, old_acc, new_acc = split_cluster_acc_v2(y_true, y_pred, mask)
    assert all_acc == pytest.approx(best / len(y_true))
    # Ties between optimal permutations may split old/new differently: ours must be one of them.
    assert any(np.allclose((all_acc, old_acc, new_acc), r[:3]) for r in optimal)
    balanced = split_cluster_acc_v2_balanced(y_true, y_pred, mask)
    assert any(np.allclose((all_acc, old_acc, new_acc) + balanced, r) for r in optimal)


def test_unique_optimum_old_new_and_balanced():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = np.array([2, 2, 2, 1, 0, 0, 1, 1, 3, 3])
    mask = y_true < 2
    best, optimal = brute_force(y_true.tolist(), y_pred.tolist(), mask.tolist())
    assert len(optimal) == 1
    expected = optimal[0]
    assert split_cluster_acc_v2(y_true, y_pred, mask) == pytest.approx(expected[:3])
    assert split_cluster_acc_v2_balanced(y_true, y_pred, mask) == pytest.approx(expected[3:])
    # By hand: clusters 2->0, 0->1, 1->2, 3->3 match 3 + 2 + 2 + 1 = 8 of 10.
    assert expected[:3] == pytest.approx((0.8, 5 / 6, 0.75))
    assert log_accs_from_preds(y_true, y_pred, mask, "v2") == pytest.approx(expected[:3])
    assert log_accs_from_preds(y_true, y_pred, mask, "v2b") == pytest.approx(expected[3:])


def test_branch_agreement_by_hand_and_brute_force():
    # By hand: the text head numbers the visual head's clusters 0 and 1 the other way round and
    # puts one image of cluster 2 elsewhere: 1 image of 6 has the same number in both, 5 once
    # text cluster 1 is read as 0, 0 as 1 and 2 as 2.
    visual, text = np.array([0, 0, 1, 1, 2, 2]), np.array([1, 1, 0, 0, 2, 0])
    assert branch_agreement(visual, text) == pytest.approx((1 / 6, 5 / 6))
    for seed in range(6):
        rng = np.random.RandomState(seed)
        visual, text, _ = random_case(rng, num_classes=4, num_clusters=5, num_old=2, n=30)
        best, _ = brute_force(visual.tolist(), text.tolist(), [True] * 30)
        assert branch_agreement(visual, text) == pytest.approx((np.mean(visual == text), best / 30))


def test_perfect_and_permuted_clusterings():
    y_true = np.repeat(np.arange(6), 5)
    mask = y_true < 3
    assert split_cluster_acc_v2(y_true, y_true, mask) == (1.0, 1.0, 1.0)
    relabel = np.array([4, 0, 5, 1, 3, 2])
    assert split_cluster_acc_v2(y_true, relabel[y_true], mask) == (1.0, 1.0, 1.0)
    assert split_cluster_acc_v2_balanced(y_true, relabel[y_true] + 10, mask) == (1.0, 1.0, 1.0)


def test_all_samples_in_one_cluster():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3])
    mask = y_true < 2
    all_acc, old_acc, new_acc = split_cluster_acc_v2(y_true, np.zeros_like(y_true), mask)
    # The single cluster can only match the largest class (class 0, 4 samples, old).
    assert (all_acc, old_acc, new_acc) == pytest.approx((4 / 9, 4 / 6, 0.0))
    balanced = split_cluster_acc_v2_balanced(y_true, np.full_like(y_true, 7), mask)
    assert balanced == pytest.approx((1 / 4, 1 / 2, 0.0))


def test_empty_group_gives_zero_without_warnings():
    y_true = np.array([0, 1, 1, 0])
    y_pred = np.array([1, 0, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert split_cluster_acc_v2(y_true, y_pred, np.ones(4, bool)) == (1.0, 1.0, 0.0)
        assert split_cluster_acc_v2(y_true, y_pred, np.zeros(4, bool)) == (1.0, 0.0, 1.0)
        assert split_cluster_acc_v2_balanced(y_true, y_pred, np.ones(4, bool)) == (1.0, 1.0, 0.0)


def test_accepts_torch_tensors_and_large_inputs():
    import torch

    rng = np.random.RandomState(0)
    y_true = rng.randint(0, 200, size=100_000)
    y_pred = (y_true + 13) % 200
    y_pred[:1000] = rng.randint(0, 200, size=1000)
    expected = 1 - np.mean(y_pred[:1000] != (y_true[:1000] + 13) % 200) * 1000 / len(y_true)
    result = split_cluster_acc_v2(torch.from_numpy(y_true), torch.from_numpy(y_pred), torch.from_numpy(y_true < 100))
    assert result[0] == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["length", "empty", "negative", "eval_func"])
def test_bad_input(bad):
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError):
        if bad == "length":
            split_cluster_acc_v2(y, y[:2], y < 1)
        elif bad == "empty":
            split_cluster_acc_v2(y[:0], y[:0], y[:0] < 1)
        elif bad == "negative":
            split_cluster_acc_v2(y, y - 1, y < 1)
        else:
            log_accs_from_preds(y, y, y < 1, eval_func="v1")
