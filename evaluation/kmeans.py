"""k-means in torch, on whatever device the features are on (CUDA or the CPU), for the K
estimate (evaluation/k_estimate.py), where scikit-learn's KMeans on the CPU took hours at
ImageNet-1K's size (1.28M images, k in the thousands).

The algorithm is scikit-learn's default (Lloyd's, seeded by greedy k-means++, the best inertia
of ``n_init`` restarts kept), in float32:

* **Seeding, greedy k-means++** (Arthur and Vassilvitskii 2007; scikit-learn's ``init``): the
  first centre is a uniformly drawn row; each next one is the best of ``2 + ln k`` candidate
  rows drawn with probability proportional to their squared distance to the nearest centre so
  far, "best" being the candidate that leaves the smallest total squared distance.
* **Lloyd iterations**: every row to its nearest centre, every centre to the mean of its
  rows, until the inertia (the sum of squared distances of the rows to their centres) drops by
  less than ``tol`` of itself in an iteration, no row changes cluster, or ``max_iter``.
* **Empty clusters** (a centre that no row is nearest to) are moved onto the rows farthest from
  their centres, as scikit-learn does: those rows are the worst served, so they are where a
  spare centre lowers the inertia most.

Memory: the squared distances ||x||^2 - 2 x.c + ||c||^2 (one matrix product) are computed for
``chunk_rows`` rows at a time, so N x k never exists at once; what is held is the features,
N x (a few numbers) and k x D.

Deterministic for a seed on a device (and a number of CPU threads): every random draw comes
from CPU ``torch.Generator``s (the same streams on every device), the sampling of k-means++
works on integer weights (an exact prefix sum: CUDA's float prefix sum may differ in the last
bit between runs), and the sums of rows per cluster use kernels that add in a fixed order.
Another device (or another BLAS) can round differently and end elsewhere; the K estimate
broadcasts rank 0's answer.

Cost (bench/estimate_k.py): about N x k. Seeding is most of it on a CPU: each of its k steps
reads all N rows once for a product with a few candidates, which a CPU's matrix kernels do at
a fraction of their speed; so the restarts are seeded together, their candidates in one
product. A Lloyd iteration is one pass over the rows, a chunk at a time (small enough to stay
in a CPU's cache): its distances, nearest centres and sums per cluster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Rows of one chunk of the N x k distances: on the CPU the chunk's rows (8 MiB at 512-d) stay
# in cache from the product to the sums per cluster (4,096 was the fastest of 256 to 16,384
# at 100k x 512, k = 100 and 1,000, on 2 EPYC cores), and the distances are capped at
# 2**22 elements (16 MiB); on a GPU bigger products keep more of it busy (1 GiB).
CHUNK_ROWS = {"cpu": 4096, "cuda": 2**20}
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
# Rows added up in float32 before their sums join the float64 totals: a float32 sum of a
# cluster's many rows would lose digits, a float64 copy of every row costs more than the
# distances (scikit-learn adds them all in float32).
SUM_ROWS = 4096
# Integer weights of k-means++'s sampling: all of them together stay below 2**53, float64's
# integers (sample_proportional).
WEIGHT_BITS = 53


@dataclass
class KMeansResult:
    labels: torch.Tensor    # int64 [N]: each row's cluster, on the features' device
    centres: torch.Tensor   # float32 [k, D]
    inertia: float          # sum over rows of the squared distance to their centre
    n_iter: int             # Lloyd iterations of the restart kept


def kmeans(features: torch.Tensor, k: int, *, n_init: int = 3, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0, chunk_rows: int | None = None) -> KMeansResult:
    """k-means of the rows of ``features`` [N, D] into ``k`` clusters on their device: the
    restart (of ``n_init``, each seeded by greedy k-means++) of lowest inertia. ``tol``: stop
    when an iteration lowers the inertia by less than this fraction of it. ``seed``: all the
    random draws. ``chunk_rows``: rows per distance computation (default: CHUNK_ROWS, fewer
    where k is large)."""
    x = torch.as_tensor(features).float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} rows into {k} clusters: k must be between 1 and {n}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init ({n_init}) and max_iter ({max_iter}) must be at least 1")
    x = x.contiguous()
    device = x.device.type
    chunk_rows = chunk_rows or max(1, min(CHUNK_ROWS.get(device, 2**16), CHUNK_ELEMENTS.get(device, 2**26) // k))
    x_sq = (x * x).sum(1)
    best = None
    for centres in kmeans_plusplus(x, x_sq, k, restart_generators(seed, n_init), chunk_rows):
        result = lloyd(x, x_sq, centres, max_iter, tol, chunk_rows)
        if best is None or result.inertia < best.inertia:  # a tie keeps the earlier restart
            best = result
    return best


def restart_generators(seed: int, n_init: int) -> list[torch.Generator]:
    """One CPU generator per restart (the same draws on every device), seeded in turn from
    ``seed``'s: more restarts from a seed begin with the fewer's."""
    stream = torch.Generator().manual_seed(seed)
    seeds = torch.randint(2**62, (n_init,), generator=stream).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------- distances
def squared_distances(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[n, k] squared distances of the rows of ``x`` (squared norms ``x_sq``) to ``centres``,
    as ||x||^2 - 2 x.c + ||c||^2: one matrix product, the cost of k-means. Rounding can make a
    tiny distance negative; it is clamped to 0."""
    c_sq = (centres * centres).sum(1)
    return torch.addmm(c_sq, x, centres.T, alpha=-2).add_(x_sq[:, None]).clamp_(min=0)


def assign(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor,
           chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the rows, ``chunk_rows`` at a time: each row's nearest centre (int64 [N];
    the first of equals), its squared distance (float32 [N]), and per cluster the sum of its
    rows (float64 [k, D]) and their number (int64 [k])."""
    k = centres.shape[0]
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    nearest = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    sums = torch.zeros(centres.shape, dtype=torch.float64, device=x.device)
    partial = torch.empty_like(centres)
    c_sq = (centres * centres).sum(1)
    for start in range(0, x.shape[0], chunk_rows):
        end = min(start + chunk_rows, x.shape[0])
        # ||x||^2 is the same for every centre of a row: added after the minimum, to the
        # minimum alone (one pass less over the chunk's distances).
        torch.min(torch.addmm(c_sq, x[start:end], centres.T, alpha=-2), dim=1,
                  out=(nearest[start:end], labels[start:end]))
        for sub in range(start, end, SUM_ROWS):
            part = slice(sub, min(sub + SUM_ROWS, end))
            sums += add_rows(partial.zero_(), labels[part], x[part])
    counts = torch.bincount(labels, minlength=k)
    return labels, nearest.add_(x_sq).clamp_(min=0), sums, counts


# ----------------------------------------------------------------------------- seeding
def kmeans_plusplus(x: torch.Tensor, x_sq: torch.Tensor, k: int, generators: list[torch.Generator],
                    chunk_rows: int) -> list[torch.Tensor]:
    """For each generator (a restart), k initial centres [k, D] by greedy k-means++: the best
    of ``2 + ln k`` candidates per centre (scikit-learn's number), where plain k-means++ takes
    one. All the restarts' candidates are compared in one product (N x restarts x trials):
    one pass over x for all of them, which costs a CPU about 1.5x one restart's, not 3x."""
    trials, restarts = 2 + int(math.log(k)), len(generators)
    every = torch.arange(restarts, device=x.device)
    chosen = [torch.cat([torch.randint(x.shape[0], (1,), generator=g) for g in generators]).to(x.device)]
    nearest = squared_distances(x, x_sq, x[chosen[0]])  # [N, restarts]: to the nearest centre so far
    if_added = torch.empty(x.shape[0], restarts, trials, device=x.device)
    for _ in range(1, k):
        candidates = torch.stack([sample_proportional(nearest[:, r], trials, g) for r, g in enumerate(generators)])
        totals = totals_if_added(x, x_sq, x[candidates.flatten()], nearest, if_added, chunk_rows)
        best = totals.argmin(1)
        chosen.append(candidates[every, best])
        nearest = if_added[:, every, best]
    picks = torch.stack(chosen, dim=1)  # [restarts, k] rows of x
    return [x[row].clone() for row in picks]


def totals_if_added(x: torch.Tensor, x_sq: torch.Tensor, candidates: torch.Tensor, nearest: torch.Tensor,
                    if_added: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """For each restart's candidates (``candidates`` [restarts x trials, D]), every row's
    squared distance to its nearest centre were the candidate added (written to ``if_added``
    [N, restarts, trials]) and their total (float64 [restarts, trials]): ``chunk_rows`` rows at
    a time, each chunk's distances taken from the product to the total while in cache."""
    restarts, trials = if_added.shape[1:]
    totals = torch.zeros(restarts, trials, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        distances = squared_distances(x[rows], x_sq[rows], candidates).view(-1, restarts, trials)
        torch.minimum(nearest[rows, :, None], distances, out=if_added[rows])
        totals += if_added[rows].sum(0)  # a chunk in float32, the chunks in float64
    return totals


def sample_proportional(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices drawn with replacement with probability proportional to ``weights`` (>= 0).

    The weights are rounded to integers, the largest to 2**53 / len: an integer prefix sum is
    exact on every device (CUDA's float one may differ in the last bit between runs), so the
    same draws pick the same rows every time, and a total below 2**53 leaves every integer
    draw in [0, total) reachable from a float64 uniform (torch.randint over a range this
    large would favour its low end: it takes a 64-bit word modulo the range). A weight below
    about 2**-53 x len of the largest rounds to 0 and is never drawn: such a row is already
    on a centre, as far as float32 can tell. All weights 0 (every row on a centre: fewer
    distinct rows than k): uniform."""
    largest = weights.max()
    if largest <= 0:
        return torch.randint(len(weights), (n,), generator=generator).to(weights.device)
    scale = (2**WEIGHT_BITS // len(weights)) / largest.double()
    cumulative = (weights.double() * scale).floor_().long().cumsum(0)
    total = int(cumulative[-1])
    draws = (torch.rand(n, dtype=torch.float64, generator=generator) * total).long().clamp_(max=total - 1)
    # The first row whose prefix sum passes the draw: row i owns draws in [cum[i-1], cum[i]).
    return torch.searchsorted(cumulative, draws.to(weights.device), right=True)


# ----------------------------------------------------------------------------- Lloyd
def lloyd(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float,
          chunk_rows: int) -> KMeansResult:
    """Lloyd iterations from ``centres``. The labels returned are the nearest centres of the
    centres returned, and the inertia is theirs."""
    labels, nearest, sums, counts = assign(x, x_sq, centres, chunk_rows)
    inertia = float(nearest.sum(dtype=torch.float64))
    for n_iter in range(1, max_iter + 1):
        centres = cluster_means(x, labels, nearest, sums, counts, centres)
        new_labels, nearest, sums, counts = assign(x, x_sq, centres, chunk_rows)
        new_inertia = float(nearest.sum(dtype=torch.float64))
        # Lloyd's inertia never rises (but for rounding); a small drop means it has settled.
        settled = inertia - new_inertia <= tol * new_inertia or torch.equal(new_labels, labels)
        labels, inertia = new_labels, new_inertia
        if settled:
            break
    return KMeansResult(labels, centres, inertia, n_iter)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, nearest: torch.Tensor, sums: torch.Tensor,
                  counts: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The next centres: each the mean of its rows (``sums`` / ``counts``, from ``assign``);
    each empty cluster's centre one of the rows farthest from their centres, that row leaving
    its cluster's mean (scikit-learn's rule). A cluster left without rows keeps its centre."""
    k = centres.shape[0]
    empty = (counts == 0).nonzero()[:, 0]
    if len(empty):
        # A stable sort: rows at equal distances are taken in row order, the same every time.
        farthest = torch.sort(nearest, descending=True, stable=True).indices[:len(empty)]
        left = labels[farthest]
        sums = add_rows(sums.clone(), left, -x[farthest].double())
        counts = counts - torch.bincount(left, minlength=k)
        sums[empty], counts[empty] = x[farthest].double(), 1
    means = (sums / counts.clamp(min=1)[:, None]).float()
    return torch.where((counts > 0)[:, None], means, centres)


def add_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``target`` with each of ``rows`` added to its row ``index``, in a fixed order: CPU's
    index_add_ adds in row order; on CUDA index_add_ adds with atomics (an order that varies
    between runs) and index_put_(accumulate=True) sorts the indices first."""
    if target.device.type == "cpu":
        return target.index_add_(0, index, rows)
    return target.index_put_((index,), rows, accumulate=True)
