"""Fidelity and diversity of a synthetic set against a real one, on feature matrices (issue 23):
Frechet distance, KID, precision/recall/density/coverage, bootstrap and Wilson intervals, and a
2-D PCA. Pure math on (n, d) arrays: no database, web, app/ or diffusers imports here.

Every number is only as meaningful as its feature space: the service's is the frozen
EfficientNet-Lite0 the classifier caches (no Inception weights offline), so name it with the
number (`fd_lite0`), and report each distance beside its real-vs-real floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import torch

CPU = torch.device("cpu")
# KID's kernel matrix between sets of up to this many rows is computed once (float64: 512 MB
# at the limit) and summed for every subset at once; a larger set pays a product per subset.
KID_GRAM_LIMIT = 8192
# A bootstrap of FD takes the products of the two sets' rows once when there are up to this
# many (float64: 128 MB at the limit), and each draw's from them; else a product per draw.
FD_CROSS_LIMIT = 2**24


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, d) arrays with the same d and at least two rows each."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) arrays with equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each set needs at least 2 rows, got {len(a)} and {len(b)}")
    return a, b


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in float64 (float16 rows are upcast once, centred first)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    x64 -= mean
    # x.T @ x of one buffer runs BLAS's syrk (half the products of a general matmul)
    cov = (x64.T @ x64) / (len(x64) - 1)
    return mean, cov


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) from the eigenvalues of a symmetric PSD matrix similar to S1 S2:
    L^T S2 L with S1 = L L^T (Cholesky) when S1 is positive definite, else S1^1/2 S2 S1^1/2
    (eigendecomposition). Either way eigvalsh applies: no complex parts or negative roots."""
    try:
        lower = np.linalg.cholesky(s1)
        inner = lower.T @ s2 @ lower
    except np.linalg.LinAlgError:  # singular (dead feature channels, fewer rows than d)
        root = _psd_sqrt(s1)
        inner = root @ s2 @ root
    return _trace_sqrt(inner)


def _trace_sqrt(matrix: np.ndarray) -> float:
    """tr sqrt(M) of a symmetric PSD matrix: the sum of its eigenvalues' roots."""
    values = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    # eigvalsh is accurate to about eps * ||M||: below that an eigenvalue is rounding noise,
    # and a thousand sqrt(1e-16) would add up to a visible error on rank-deficient covariances
    noise = np.finfo(np.float64).eps * len(values) * max(float(values.max(initial=0.0)), 0.0)
    return float(np.sqrt(values[values > noise]).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), in float64."""
    a, b = _check_pair(a, b)
    mean_a, cov_a = _mean_cov(a)
    mean_b, cov_b = _mean_cov(b)
    diff = mean_a - mean_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * _trace_sqrt_product(cov_a, cov_b)
    return max(float(value), 0.0)  # a tiny negative is rounding, not a distance


def _resample_counts(n: int, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """`resamples` bootstrap draws of n rows with replacement, each as every row's count:
    (resamples, n) integers, each row of them summing to n."""
    picks = generator.integers(0, n, (resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(picks.ravel(), minlength=resamples * n).reshape(resamples, n)


def frechet_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int, seed: int = 0) -> np.ndarray:
    """The Frechet distance of each of `resamples` bootstrap draws of both sets (the rows of
    each drawn with replacement, seeded), float64. A draw is each row's count: its means and
    covariances are count-weighted sums over the distinct rows it holds (about 63% of them).
    tr sqrt(S_a S_b) is the sum of the singular values of X_a X_b^T over sqrt((n - 1)(m - 1)),
    X being a draw's distinct rows centred and weighted by sqrt(count): while a draw holds
    fewer distinct rows than d, an eigenproblem of their number (the rows' span, as in the
    point estimate's projection), its X_a X_b^T taken from the sets' row products, computed
    once (up to FD_CROSS_LIMIT entries); else one of d, from the covariances."""
    a, b = _check_pair(a, b)
    if resamples < 1:
        raise ValueError(f"need resamples >= 1, got {resamples}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    n, m, dims = len(a64), len(b64), a64.shape[1]
    # FD does not move with both sets; centred on their union's mean, the products below
    # lose no digits to a large common mean (post-ReLU features are all positive)
    centre = (a64.sum(axis=0) + b64.sum(axis=0)) / (n + m)
    a64 -= centre
    b64 -= centre
    norms_a, norms_b = np.einsum("ij,ij->i", a64, a64), np.einsum("ij,ij->i", b64, b64)
    generator = np.random.default_rng(seed)
    counts_a = _resample_counts(n, resamples, generator)
    counts_b = _resample_counts(m, resamples, generator)
    cross: np.ndarray | None = None  # a64 @ b64.T, once a draw needs it
    values = np.empty(resamples)
    for r in range(resamples):
        held_a, held_b = counts_a[r] > 0, counts_b[r] > 0
        weights_a, weights_b = counts_a[r][held_a].astype(np.float64), counts_b[r][held_b]
        rows_a, rows_b = a64[held_a], b64[held_b]
        mean_a, mean_b = weights_a @ rows_a / n, weights_b @ rows_b / m
        traces = (weights_a @ norms_a[held_a] - n * mean_a @ mean_a) / (n - 1)
        traces += (weights_b @ norms_b[held_b] - m * mean_b @ mean_b) / (m - 1)
        if min(len(rows_a), len(rows_b)) < dims:
            if cross is None and n * m <= FD_CROSS_LIMIT:
                cross = a64 @ b64.T  # (n, m)
            products = cross[np.ix_(held_a, held_b)] if cross is not None else rows_a @ rows_b.T
            # (a - mean_a).(b - mean_b) for every pair, weighted: X_a X_b^T, (n', m')
            products -= (rows_a @ mean_b)[:, None] + (rows_b @ mean_a)[None, :] - mean_a @ mean_b
            products *= np.sqrt(weights_a)[:, None] * np.sqrt(weights_b)[None, :]
            small = products.T if len(rows_a) > len(rows_b) else products
            root = _trace_sqrt(small @ small.T) / np.sqrt((n - 1) * (m - 1))
        else:
            rows_a = (rows_a - mean_a) * np.sqrt(weights_a)[:, None]
            rows_b = (rows_b - mean_b) * np.sqrt(weights_b)[:, None]
            root = _trace_sqrt_product(rows_a.T @ rows_a / (n - 1), rows_b.T @ rows_b / (m - 1))
        diff = mean_a - mean_b
        values[r] = max(float(diff @ diff + traces - 2 * root), 0.0)
    return values


def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cubic polynomial kernel (x.y / d + 1)^3 of KID, float32: (len(x), len(y))."""
    return torch.addmm(torch.ones(()), x, y.T, alpha=1.0 / x.shape[1]).pow_(3)


def _subset_sums(
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, same: bool
) -> np.ndarray:
    """For each subset s, the sum of k(x_i, y_j) over i in rows[s], j in cols[s] (i != j when
    y is x), float64. Small sets: the kernel matrix once, then every subset's sum at once as
    diag(R K C^T) with R, C the subsets' 0/1 indicator rows; large sets: a product per subset
    (never more than subset_size^2 kernel values in memory)."""
    if len(x) > KID_GRAM_LIMIT or len(y) > KID_GRAM_LIMIT:
        per_subset: list[float] = []
        for i, j in zip(rows, cols, strict=True):
            block = _kernel(x[i], y[j])
            total = float(block.sum(dtype=torch.float64))
            per_subset.append(total - float(block.diagonal().sum(dtype=torch.float64)) * same)
        return np.array(per_subset)
    matrix = _kernel(x, y).double()  # (n_x, n_y)
    subsets = len(rows)
    pick_rows = torch.zeros(subsets, len(x), dtype=torch.float64)
    pick_rows[torch.arange(subsets)[:, None], rows] = 1.0
    pick_cols = torch.zeros(subsets, len(y), dtype=torch.float64)
    pick_cols[torch.arange(subsets)[:, None], cols] = 1.0
    sums = ((pick_rows @ matrix) * pick_cols).sum(dim=1)
    if same:  # rows and cols are the same subset: drop k(x_i, x_i)
        sums -= pick_rows @ matrix.diagonal()
    return sums.numpy()


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std over `subsets` random subsets of the unbiased
    MMD^2 estimate with the kernel (x.y / d + 1)^3. `subset_size` is clipped to the smaller set;
    when it covers both sets whole every subset is the same set, so it is computed once (std 0).
    Kernel values are float32 products, their sums float64. A set against itself is slightly
    negative: its two subsets share rows, and k(x, x) is large."""
    a, b = _check_pair(a, b)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    if m == len(a) == len(b):
        subsets = 1  # every draw would be a permutation of the whole sets
    generator = np.random.default_rng(seed)
    draws = [
        (generator.choice(len(a), m, replace=False), generator.choice(len(b), m, replace=False))
        for _ in range(subsets)
    ]
    rows = torch.from_numpy(np.stack([i for i, _ in draws]))  # (subsets, m)
    cols = torch.from_numpy(np.stack([j for _, j in draws]))
    within = _subset_sums(x, x, rows, rows, same=True) + _subset_sums(y, y, cols, cols, same=True)
    between = _subset_sums(x, y, rows, cols, same=False)
    values = within / (m * (m - 1)) - 2 * between / (m * m)
    return float(values.mean()), float(values.std())


def _weighted_kernel_sums(
    x: torch.Tensor, y: torch.Tensor, x_counts: torch.Tensor, y_counts: torch.Tensor, *,
    same: bool, chunk: int,
) -> np.ndarray:  # fmt: skip
    """For each resample r, the sum of x_counts[r, i] k(x_i, y_j) y_counts[r, j] over i and j,
    less x_counts[r, i]^2 k(x_i, x_i) when y is x (a row paired with its own repeats), float64:
    the kernel `chunk` rows of x at a time, never more than chunk x len(y) values in memory."""
    sums = torch.zeros(len(x_counts), dtype=torch.float64)
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        block = _kernel(x[start:stop], y).double()  # (chunk, len(y))
        sums += ((x_counts[:, start:stop] @ block) * y_counts).sum(dim=1)
        if same:
            sums -= x_counts[:, start:stop].square() @ block[:, start:stop].diagonal()
    return sums.numpy()


def kid_bootstrap(
    a: np.ndarray, b: np.ndarray, *, resamples: int, seed: int = 0, chunk: int = 1024
) -> np.ndarray:
    """KID's unbiased MMD^2 between the whole of each of `resamples` bootstrap draws of both
    sets (the rows of each drawn with replacement, seeded), float64. A draw repeats rows, and a
    row paired with its own repeat counts k(x, x), far above any k(x, y): within a set such
    pairs are left out and the sum divided by the pairs left (n^2 - sum of squared counts), so
    a draw's value is again unbiased and the draws centre on the MMD^2 of the whole sets. Each
    kernel matrix is computed once, a chunk of rows at a time, for every draw at once."""
    a, b = _check_pair(a, b)
    if resamples < 1:
        raise ValueError(f"need resamples >= 1, got {resamples}")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    generator = np.random.default_rng(seed)
    x_counts = _resample_counts(len(x), resamples, generator)
    y_counts = _resample_counts(len(y), resamples, generator)
    x_pairs = len(x) ** 2 - (x_counts**2).sum(axis=1)  # pairs of distinct draws
    y_pairs = len(y) ** 2 - (y_counts**2).sum(axis=1)
    cx, cy = torch.from_numpy(x_counts).double(), torch.from_numpy(y_counts).double()
    within_x = _weighted_kernel_sums(x, x, cx, cx, same=True, chunk=chunk)
    within_y = _weighted_kernel_sums(y, y, cy, cy, same=True, chunk=chunk)
    between = _weighted_kernel_sums(x, y, cx, cy, same=False, chunk=chunk)
    with np.errstate(divide="ignore", invalid="ignore"):  # a draw of one row repeated: NaN
        return within_x / x_pairs + within_y / y_pairs - 2 * between / (len(x) * len(y))


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1)


def _squared_distances(
    x: torch.Tensor, x_norms: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor
) -> torch.Tensor:
    """|x_i - y_j|^2 for a chunk of x against all of y, float32, clamped at 0: (len(x), len(y))."""
    products = torch.addmm(y_norms[None, :], x, y.T, alpha=-2.0)
    return products.add_(x_norms[:, None]).clamp_(min=0.0)


def _as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), device=device).float().contiguous()


def _knn_radii2(points: torch.Tensor, *, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest OTHER row, chunk rows at a time."""
    if not 1 <= k < len(points):
        raise ValueError(f"k must be in [1, {len(points) - 1}] for {len(points)} rows, got {k}")
    norms = _squared_norms(points)
    radii2 = torch.empty(len(points), device=points.device)
    for start in range(0, len(points), chunk):
        stop = min(start + chunk, len(points))
        block = _squared_distances(points[start:stop], norms[start:stop], points, norms)
        rows = torch.arange(stop - start, device=points.device)
        block[rows, rows + start] = float("inf")  # a point is not its own neighbour
        radii2[start:stop] = block.topk(k, dim=1, largest=False).values[:, -1]
    return radii2


def knn_radii(
    x: np.ndarray, *, k: int = 5, device: torch.device = CPU, chunk: int = 4096
) -> np.ndarray:
    """Distance from each row to its k-th nearest OTHER row (float32), a chunk of rows at a
    time against the whole set: never more than chunk x n distances in memory."""
    return _knn_radii2(_as_tensor(x, device), k=k, chunk=chunk).sqrt_().cpu().numpy()


def prdc(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    k: int = 5,
    device: torch.device = CPU,
    chunk: int = 4096,
    match_sizes: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020)
    with k-NN balls, float32 distances in chunks of `chunk` rows.

    precision: share of fakes inside some real ball; density: real balls holding each fake,
    averaged and divided by k; coverage: share of reals whose ball holds some fake; recall: share
    of reals inside some fake ball. Recall and coverage grow with the number of fakes (more and
    smaller balls), so with `match_sizes` and more fakes than reals both use a seeded random
    subset of len(real) fakes (the papers compare equal sizes; it also keeps the fakes' k-NN
    radii at n_real^2 distances instead of n_fake^2). Precision and density use every fake.
    """
    real_t, fake_t = _as_tensor(real, device), _as_tensor(fake, device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"expected (n, d) arrays with equal d, got {real.shape}, {fake.shape}")
    in_subset = torch.ones(len(fake_t), dtype=torch.bool)
    if match_sizes and len(fake_t) > len(real_t):
        chosen = np.random.default_rng(seed).choice(len(fake_t), len(real_t), replace=False)
        in_subset = torch.zeros(len(fake_t), dtype=torch.bool)
        in_subset[torch.from_numpy(np.sort(chosen))] = True
    in_subset = in_subset.to(device)
    real_radii2 = _knn_radii2(real_t, k=k, chunk=chunk)
    fake_radii2 = torch.full((len(fake_t),), float("nan"), device=device)
    fake_radii2[in_subset] = _knn_radii2(fake_t[in_subset], k=k, chunk=chunk)

    real_norms, fake_norms = _squared_norms(real_t), _squared_norms(fake_t)
    inside_real = torch.zeros(len(fake_t), dtype=torch.bool, device=device)  # precision
    balls_holding = torch.zeros(len(fake_t), device=device)  # density
    covered = torch.zeros(len(real_t), dtype=torch.bool, device=device)  # coverage
    recalled = torch.zeros(len(real_t), dtype=torch.bool, device=device)  # recall
    for start in range(0, len(fake_t), chunk):
        stop = min(start + chunk, len(fake_t))
        block = _squared_distances(
            fake_t[start:stop], fake_norms[start:stop], real_t, real_norms
        )  # (chunk, n_real)
        within_real = block <= real_radii2[None, :]
        inside_real[start:stop] = within_real.any(dim=1)
        balls_holding[start:stop] = within_real.sum(dim=1).float()
        members = in_subset[start:stop]
        if members.any():
            covered |= within_real[members].any(dim=0)
            recalled |= (block[members] <= fake_radii2[start:stop][members][:, None]).any(dim=0)
    return {
        "precision": float(inside_real.float().mean()),
        "recall": float(recalled.float().mean()),
        "density": float(balls_holding.mean()) / k,
        "coverage": float(covered.float().mean()),
    }


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval: `statistic(rows)` on `resamples` draws of n row indices
    with replacement. Draws where the statistic is NaN (e.g. an empty group) are left out."""
    if n < 1 or resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n >= 1, resamples >= 1, 0 < level < 1: {n}, {resamples}, {level}")
    generator = np.random.default_rng(seed)
    values = np.array([statistic(generator.integers(0, n, n)) for _ in range(resamples)])
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def centred_percentile_ci(
    values: np.ndarray, estimate: float, *, level: float = 0.95, lowest: float = -math.inf
) -> tuple[float, float]:
    """The percentile interval of bootstrap `values`, moved by the bootstrap's estimate of the
    statistic's bias (their mean less the point `estimate`) and clipped below at `lowest`.
    For a biased statistic the draws sit off the estimate (FD: a draw repeats rows, and fewer
    distinct rows raise FD as a smaller sample does, by about d / n), and the plain percentile
    interval could miss the estimate entirely; moved, it is the spread of the statistic at
    these sample sizes around the estimate. NaN draws are left out ((NaN, NaN) if all are)."""
    if not 0 < level < 1:
        raise ValueError(f"need 0 < level < 1, got {level}")
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values) or not math.isfinite(estimate):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail]) - (values.mean() - estimate)
    return max(float(low), lowest), max(float(high), lowest)


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials ((0, 1) when n is 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def pca_2d(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Both sets projected on the first two principal components of their union (float64,
    each component's sign fixed so its largest loading is positive), and the two components'
    explained variance ratios."""
    a, b = _check_pair(a, b)
    union = np.concatenate([a, b]).astype(np.float64)
    mean, cov = _mean_cov(union)
    values, vectors = np.linalg.eigh(cov)
    top = vectors[:, ::-1][:, :2]  # (d, 2), eigh sorts ascending
    signs = np.sign(top[np.abs(top).argmax(axis=0), [0, 1]])
    top = top * np.where(signs == 0, 1.0, signs)
    total = float(values.clip(min=0).sum())
    ratios = [float(v / total) if total > 0 else 0.0 for v in values[::-1][:2]]
    return (a.astype(np.float64) - mean) @ top, (b.astype(np.float64) - mean) @ top, ratios
