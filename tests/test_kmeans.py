"""The torch k-means of the K estimate (evaluation/kmeans.py), against checks that do not use
it: the true partition of well-separated blobs, a brute-force float64 recomputation of its
labels and inertia, scikit-learn's KMeans (the algorithm it replaces) on data where k-means
has no single answer, and its own rules for seeding (restarts seeded together as if alone),
empty clusters, chunks and seeds. bench/estimate_k.py runs in tests/test_gpu_check.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from evaluation import kmeans as KM

CUDA = torch.device("cuda")  # the CUDA test's device


def blobs(seed: int, sizes=(60, 40, 25, 80, 30, 50), dim: int = 8, spread: float = 0.3):
    """Gaussian blobs of unequal sizes whose centres are at least 4 apart (10 x ``spread``):
    (rows float32 [N, dim], true blob int [N])."""
    rng = np.random.default_rng(seed)
    centres = []
    while len(centres) < len(sizes):  # rejection keeps every pair of centres apart
        c = rng.uniform(-6, 6, dim)
        if all(np.linalg.norm(c - o) >= 4 for o in centres):
            centres.append(c)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    rows = np.asarray(centres)[truth] + spread * rng.normal(size=(len(truth), dim))
    order = rng.permutation(len(truth))  # blobs interleaved: no row order to lean on
    return torch.from_numpy(rows[order].astype(np.float32)), truth[order]


def uniform(seed: int, n: int = 1500, dim: int = 8) -> torch.Tensor:
    """Uniform rows in the unit cube: no clusters, many local optima of similar inertia."""
    return torch.from_numpy(np.random.default_rng(seed).random((n, dim), dtype=np.float32))


def brute_force(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared distances [N, k] in float64, as differences (no ||x||^2 - 2 x.c + ||c||^2)."""
    return ((x.double()[:, None, :] - centres.double()[None, :, :]) ** 2).sum(-1)


def test_well_separated_blobs_are_recovered_exactly_and_the_result_is_self_consistent():
    for seed in range(3):
        x, truth = blobs(seed)
        result = KM.kmeans(x, 6, seed=seed)
        assert adjusted_rand_score(truth, result.labels.numpy()) == 1.0
        distances = brute_force(x, result.centres)
        # Each row is at its nearest centre, the inertia is the sum of those distances, and each
        # centre is the mean of its rows (a fixed point of Lloyd's iteration).
        assert torch.equal(result.labels, distances.argmin(1))
        inertia = distances.gather(1, result.labels[:, None]).sum().item()
        assert result.inertia == pytest.approx(inertia, rel=1e-5)
        means = torch.stack([x[result.labels == j].double().mean(0) for j in range(6)])
        torch.testing.assert_close(result.centres.double(), means, atol=1e-5, rtol=0)
        assert result.n_iter <= 5  # k-means++ seeds one centre per blob: little left to do


def test_greedy_kmeans_plusplus_seeds_one_centre_per_blob():
    # The blobs are far apart next to their spread, so a second seed in a covered blob is
    # (almost) never drawn. Uniformly drawn seeds would miss a blob in most of these draws:
    # the smallest holds 25 of 285 rows.
    x, truth = blobs(0)
    x_sq = (x * x).sum(1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(10)]
    for centres in KM.kmeans_plusplus(x, x_sq, 6, generators, chunk_rows=100):  # ten restarts seeded together
        rows = brute_force(centres, x).argmin(1)  # each seed is a row of x: the one at distance 0
        assert torch.equal(x[rows], centres)
        assert sorted(truth[rows.numpy()]) == list(range(6))


def test_restarts_seeded_together_are_each_as_if_seeded_alone_and_differ():
    x = uniform(3)
    x_sq = (x * x).sum(1)
    together = KM.kmeans_plusplus(x, x_sq, 30, KM.restart_generators(7, 3), chunk_rows=4096)
    alone = [KM.kmeans_plusplus(x, x_sq, 30, [g], chunk_rows=4096)[0] for g in KM.restart_generators(7, 3)]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    # Three streams, three different seedings (not one repeated), none with a centre twice.
    assert not torch.equal(together[0], together[1]) and not torch.equal(together[1], together[2])
    assert all(len(c.unique(dim=0)) == 30 for c in together)


def test_sampling_is_proportional_to_the_weights_and_never_draws_a_zero():
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0, 6.0, 1e-3])
    draws = KM.sample_proportional(weights, 40000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    expected = weights.double() / weights.sum()
    assert freq[0] == freq[3] == 0
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)  # 4 standard errors at 0.6 (0.0024)
    assert torch.equal(KM.sample_proportional(torch.zeros(4), 50, torch.Generator().manual_seed(0)).unique(),
                       torch.arange(4))  # all at a centre: uniform


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_inertia_is_that_of_scikit_learn_on_data_without_clusters(seed):
    # Uniform rows have many local optima of about the same inertia: two scikit-learn runs with
    # different seeds differ by up to 1.1% here (measured over 8 data sets), so 2% is the bound.
    x = uniform(seed)
    ours = KM.kmeans(x, 30, n_init=3, seed=seed).inertia
    theirs = KMeans(30, n_init=3, random_state=seed).fit(x.numpy()).inertia_
    assert ours == pytest.approx(theirs, rel=0.02)


def test_deterministic_for_a_seed_and_different_for_another():
    x = uniform(0)
    a, b, c = (KM.kmeans(x, 30, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centres, b.centres) and a.inertia == b.inertia
    assert not torch.equal(a.centres, c.centres) and a.inertia != c.inertia
    # Restarts continue one stream, so more of them from one seed include the fewer: the best
    # inertia kept can only go down.
    inertias = [KM.kmeans(x, 30, seed=5, n_init=n).inertia for n in (1, 3, 6)]
    assert inertias[0] >= inertias[1] >= inertias[2] and inertias[0] > inertias[2]


def test_chunks_change_nothing():
    x = uniform(1)
    whole = KM.kmeans(x, 30, seed=0, chunk_rows=len(x))
    for chunk_rows in (7, 256):
        chunked = KM.kmeans(x, 30, seed=0, chunk_rows=chunk_rows)
        assert torch.equal(chunked.labels, whole.labels)
        torch.testing.assert_close(chunked.centres, whole.centres)
        assert chunked.inertia == pytest.approx(whole.inertia, rel=1e-6)
    # The distances of the chunks, against brute force.
    labels, nearest, _, _ = KM.assign(x, (x * x).sum(1), whole.centres, chunk_rows=13)
    torch.testing.assert_close(nearest.double(), brute_force(x, whole.centres).min(1).values, atol=1e-5, rtol=0)


def test_an_empty_cluster_takes_the_row_farthest_from_its_centre():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [20.0, 0.0], [21.0, 0.0]])
    centres = torch.tensor([[1.0, 0.0], [20.0, 0.0], [-50.0, 0.0]])  # nobody's nearest: the third
    x_sq = (x * x).sum(1)
    labels, nearest, sums, counts = KM.assign(x, x_sq, centres, chunk_rows=2)
    assert labels.tolist() == [0, 0, 0, 1, 1] and nearest.tolist() == [1.0, 0.0, 81.0, 0.0, 1.0]
    assert counts.tolist() == [3, 2, 0]
    torch.testing.assert_close(sums, torch.tensor([[11.0, 0.0], [41.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    new = KM.cluster_means(x, labels, nearest, sums, counts, centres)
    # Row 2 (the farthest, 81) becomes cluster 2's centre and leaves cluster 0's mean.
    torch.testing.assert_close(new, torch.tensor([[0.5, 0.0], [20.5, 0.0], [10.0, 0.0]]))

    # End to end: from those centres Lloyd ends with three non-empty clusters and the optimum.
    result = KM.lloyd(x, x_sq, centres, max_iter=10, tol=0.0, chunk_rows=2)
    assert sorted(torch.bincount(result.labels, minlength=3).tolist()) == [1, 2, 2]
    assert result.inertia == pytest.approx(0.5 + 0.5, abs=1e-5)


def test_fewer_distinct_rows_than_clusters():
    rows = torch.arange(6, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 2.0]])
    x = rows.repeat(5, 1)  # 6 distinct rows, 5 copies each
    result = KM.kmeans(x, 8, seed=0)
    assert torch.isfinite(result.centres).all() and result.inertia == 0
    assert torch.equal(result.centres[result.labels], x)


def test_bad_arguments():
    x = uniform(0, n=10)
    for k in (0, 11):
        with pytest.raises(ValueError, match="k must be between 1 and 10"):
            KM.kmeans(x, k)
    with pytest.raises(ValueError, match="must be at least 1"):
        KM.kmeans(x, 3, n_init=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_is_deterministic_and_agrees_with_the_cpu():
    x = uniform(2, n=20000, dim=32)
    cpu = KM.kmeans(x, 100, seed=0)
    a, b = (KM.kmeans(x.to(CUDA), 100, seed=0) for _ in range(2))
    assert a.labels.device.type == "cuda"
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centres, b.centres)
    assert a.inertia == pytest.approx(cpu.inertia, rel=0.01)  # rounding may end in another optimum
    x, truth = blobs(0)
    assert adjusted_rand_score(truth, KM.kmeans(x.to(CUDA), 6, seed=0).labels.cpu().numpy()) == 1.0

