"""Fidelity and diversity metrics (issue 23) pinned on hand-made fixtures: FD against the closed
form, KID against a direct float64 estimate, precision/recall/density/coverage of shifted and
half-covering sets, the chunked k-NN path against an all-pairs reference, and the intervals
(FD's and KID's bootstrap against the measures on each drawn set, and against the spread of
the measures over fresh draws of known distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import quality
from models.quality import (
    bootstrap_ci,
    centred_percentile_ci,
    frechet_bootstrap,
    frechet_distance,
    kernel_inception_distance,
    kid_bootstrap,
    knn_radii,
    pca_2d,
    prdc,
    proportion_ci,
)


def exact_gaussian_sample(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n rows whose sample mean and unbiased covariance are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)  # whitened
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    x = np.random.default_rng(0).standard_normal((500, 64)).astype(np.float16)
    scale = np.trace(np.cov(x.astype(np.float64), rowvar=False))
    assert frechet_distance(x, x) <= 1e-6 * scale
    # fewer rows than dimensions: a rank-deficient covariance, still 0
    few = x[:40]
    assert frechet_distance(few, few) <= 1e-6 * np.trace(np.cov(few.astype(float), rowvar=False))


def test_frechet_distance_equals_the_closed_form() -> None:
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = exact_gaussian_sample(mean_a, np.diag(var_a), 400, seed=1)
    b = exact_gaussian_sample(mean_b, np.diag(var_b), 300, seed=2)
    expected = 1 + 4 + 0.25 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # covariances that do not commute (2-d): tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), M = S_a S_b
    cov_a, cov_b = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    product = cov_a @ cov_b
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = 1.0**2 + 2.0**2 + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    a = exact_gaussian_sample(np.zeros(2), cov_a, 200, seed=3)
    b = exact_gaussian_sample(np.array([1.0, 2.0]), cov_b, 250, seed=4)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with (x.y/d + 1)^3, all in float64, written out."""
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def test_kid_is_the_unbiased_mmd_and_about_zero_for_identical_sets() -> None:
    generator = np.random.default_rng(5)
    x, y = generator.standard_normal((300, 32)), generator.standard_normal((300, 32)) + 0.5
    mean, std = kernel_inception_distance(x, y, subset_size=1000)  # clipped to 300: whole sets
    assert mean == pytest.approx(direct_mmd2(x, y), rel=1e-5)
    assert std == 0.0
    shifted, _ = kernel_inception_distance(x, y, subsets=50, subset_size=100)
    assert shifted > 0.2
    # two draws of one distribution: 0 within three standard errors
    other = generator.standard_normal((300, 32))
    same, spread = kernel_inception_distance(x, other, subsets=50, subset_size=100)
    assert abs(same) < 3 * spread / math.sqrt(50) + 1e-3
    # one set against itself: the subsets share a few rows (k(x, x) is large), a small
    # negative bias, here about -2 * 5 shared / 100^2 * 7
    big = generator.standard_normal((2000, 32))
    itself, _ = kernel_inception_distance(big, big, subsets=50, subset_size=100)
    assert abs(itself) < 0.05 * shifted


def test_kid_is_the_same_with_and_without_precomputed_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = np.random.default_rng(6)
    x, y = generator.standard_normal((120, 16)), generator.standard_normal((90, 16)) * 1.3
    with_gram = kernel_inception_distance(x, y, subsets=7, subset_size=40, seed=3)
    monkeypatch.setattr(quality, "KID_GRAM_LIMIT", 0)
    without = kernel_inception_distance(x, y, subsets=7, subset_size=40, seed=3)
    assert with_gram == pytest.approx(without, rel=1e-5)


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Precision, recall, density and coverage from all-pairs float64 distance matrices."""

    def distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x[:, None, :] - y[None, :, :], axis=2)

    real_real, fake_fake = distances(real, real), distances(fake, fake)
    np.fill_diagonal(real_real, np.inf)
    np.fill_diagonal(fake_fake, np.inf)
    real_radii = np.sort(real_real, axis=1)[:, k - 1]
    fake_radii = np.sort(fake_fake, axis=1)[:, k - 1]
    fake_real = distances(fake, real)  # (n_fake, n_real)
    return {
        "precision": float((fake_real <= real_radii[None, :]).any(axis=1).mean()),
        "recall": float((fake_real <= fake_radii[:, None]).any(axis=0).mean()),
        "density": float((fake_real <= real_radii[None, :]).sum(axis=1).mean() / k),
        "coverage": float((fake_real.min(axis=0) <= real_radii).mean()),
    }


def test_knn_radii_in_chunks_equal_all_pairs() -> None:
    x = np.random.default_rng(7).standard_normal((101, 12)).astype(np.float16)
    all_pairs = np.linalg.norm(x[:, None].astype(float) - x[None].astype(float), axis=2)
    np.fill_diagonal(all_pairs, np.inf)
    expected = np.sort(all_pairs, axis=1)[:, 4]
    for chunk in (1, 7, 100, 4096):
        assert np.allclose(knn_radii(x, k=5, chunk=chunk), expected, rtol=1e-4)


def test_chunked_prdc_equals_the_all_pairs_reference() -> None:
    generator = np.random.default_rng(8)
    real = generator.standard_normal((203, 6))
    fake = generator.standard_normal((157, 6)) * 1.2 + 0.3
    expected = reference_prdc(real, fake, k=5)
    for chunk in (13, 4096):
        got = prdc(real, fake, k=5, chunk=chunk, match_sizes=False)
        # float32 against float64 distances may flip a point lying on a ball's edge: one at most
        assert got == pytest.approx(expected, abs=1.01 / 157)


def test_prdc_of_one_distribution_is_high_and_of_a_far_one_is_zero() -> None:
    generator = np.random.default_rng(9)
    real, fake = generator.standard_normal((1000, 4)), generator.standard_normal((1000, 4))
    same = prdc(real, fake)
    assert same["precision"] > 0.9 and same["recall"] > 0.9 and same["coverage"] > 0.9
    assert 0.8 < same["density"] < 1.2
    far = prdc(real, fake + 50.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_fakes_covering_half_the_support_recall_and_cover_about_half() -> None:
    generator = np.random.default_rng(10)
    real = generator.uniform(0, 1, (2000, 2))
    half = generator.uniform(0, 1, (6000, 2)) * [0.5, 1.0]  # the left half, 3x as many
    result = prdc(real, half)  # recall and coverage on a matched subset of 2000 fakes
    assert result["precision"] > 0.97
    assert 0.45 < result["recall"] < 0.56
    assert 0.45 < result["coverage"] < 0.56
    assert 0.85 < result["density"] < 1.15  # the fakes' own region is sampled as densely


def test_bootstrap_interval_holds_the_mean_and_has_the_normal_width() -> None:
    sample = np.random.default_rng(11).normal(3.0, 2.0, 400)
    low, high = bootstrap_ci(lambda rows: float(sample[rows].mean()), len(sample), seed=1)
    assert low < sample.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(400), rel=0.2)
    assert bootstrap_ci(lambda rows: float("nan"), 10, resamples=5) != (0.0, 0.0)


def _draws(n: int, m: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The row counts frechet_bootstrap and kid_bootstrap draw with `seed`: the first set's
    resamples, then the second's."""
    generator = np.random.default_rng(seed)
    return (
        quality._resample_counts(n, resamples, generator),
        quality._resample_counts(m, resamples, generator),
    )


def test_frechet_bootstrap_is_the_distance_of_each_drawn_set() -> None:
    generator = np.random.default_rng(13)
    # fewer distinct rows than dimensions (singular values of the rows), then more (covariances)
    for n, m, d in ((30, 40, 64), (300, 200, 8)):
        a = generator.standard_normal((n, d))
        b = generator.standard_normal((m, d)) * 1.5 + 0.3
        values = frechet_bootstrap(a, b, resamples=3, seed=5)
        counts_a, counts_b = _draws(n, m, 3, seed=5)
        assert (counts_a.sum(axis=1) == n).all() and (counts_b.sum(axis=1) == m).all()
        for r in range(3):
            drawn_a, drawn_b = np.repeat(a, counts_a[r], axis=0), np.repeat(b, counts_b[r], axis=0)
            assert values[r] == pytest.approx(frechet_distance(drawn_a, drawn_b), rel=1e-9)


def test_kid_bootstrap_is_the_unbiased_mmd_of_each_drawn_set_without_self_pairs() -> None:
    generator = np.random.default_rng(14)
    n, m, d = 50, 35, 16
    a, b = generator.standard_normal((n, d)), generator.standard_normal((m, d)) + 0.4
    values = kid_bootstrap(a, b, resamples=4, seed=2, chunk=7)  # chunks that split the sets
    counts_a, counts_b = _draws(n, m, 4, seed=2)
    for r in range(4):
        rows_a, rows_b = np.repeat(np.arange(n), counts_a[r]), np.repeat(np.arange(m), counts_b[r])
        x, y = a[rows_a], b[rows_b]
        kxx, kyy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3
        # a row against a repeat of itself is not a pair of two draws: left out
        other_x, other_y = rows_a[:, None] != rows_a, rows_b[:, None] != rows_b
        expected = (kxx[other_x].mean() + kyy[other_y].mean()
                    - 2 * (((x @ y.T) / d + 1) ** 3).mean())  # fmt: skip
        assert values[r] == pytest.approx(expected, rel=1e-5)


def test_centred_percentile_interval_moves_by_the_bootstrap_bias() -> None:
    draws = np.arange(1.0, 102.0)  # percentiles 3.5 and 98.5, mean 51
    assert centred_percentile_ci(draws, 41.0) == pytest.approx((-6.5, 88.5))
    assert centred_percentile_ci(draws, 41.0, lowest=0.0) == pytest.approx((0.0, 88.5))
    assert centred_percentile_ci(np.append(draws, np.nan), 41.0) == pytest.approx((-6.5, 88.5))
    assert all(math.isnan(v) for v in centred_percentile_ci(np.array([np.nan]), 1.0))


def fd_interval(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 200, seed: int = 0
) -> tuple[float, float]:
    draws = frechet_bootstrap(a, b, resamples=resamples, seed=seed)
    return centred_percentile_ci(draws, frechet_distance(a, b), lowest=0.0)


def kid_interval(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 500, seed: int = 0
) -> tuple[float, float]:
    draws = kid_bootstrap(a, b, resamples=resamples, seed=seed)
    return centred_percentile_ci(draws, kernel_inception_distance(a, b)[0])


def test_fd_and_kid_intervals_tell_one_gaussian_from_shifted_ones() -> None:
    generator = np.random.default_rng(15)
    a, b = generator.standard_normal((1000, 4)), generator.standard_normal((1000, 4))
    # two disjoint draws of one Gaussian: both intervals reach 0
    low, high = fd_interval(a, b)
    assert low < 0.005 and low <= frechet_distance(a, b) < high < 0.05
    low, high = kid_interval(a, b)
    assert low < 0 < high
    # shifted by 0.5 in each of 4 dimensions, FD 1: both intervals exclude 0, FD's holds 1
    shifted = b + 0.5
    low, high = fd_interval(a, shifted)
    assert 0.5 < low < 1.0 < high < 1.5
    low, high = kid_interval(a, shifted)
    assert low > 0.5
    # reproducible with one seed, another with another; ten times the rows: about sqrt(10)
    # times narrower
    assert fd_interval(a, shifted, seed=3) == fd_interval(a, shifted, seed=3)
    assert fd_interval(a, shifted, seed=3) != fd_interval(a, shifted, seed=4)
    assert kid_interval(a, shifted, seed=3) == kid_interval(a, shifted, seed=3)
    for interval in (fd_interval, kid_interval):
        wide, narrow = interval(a[:100], shifted[:100]), interval(a, shifted)
        assert 2 < (wide[1] - wide[0]) / (narrow[1] - narrow[0]) < 5


def test_intervals_hold_the_estimate_where_fd_is_mostly_bias() -> None:
    # 60 against 60 rows in 256 dimensions: FD is mostly its d / n bias, and a draw's repeated
    # rows raise it further: the plain percentile interval lies above the estimate
    generator = np.random.default_rng(16)
    a, b = generator.standard_normal((60, 256)), generator.standard_normal((60, 256))
    fd = frechet_distance(a, b)
    assert np.percentile(frechet_bootstrap(a, b, resamples=200, seed=0), 2.5) > fd
    low, high = fd_interval(a, b)
    assert low < fd < high
    kid = kernel_inception_distance(a, b)[0]
    low, high = kid_interval(a, b)
    assert low < kid < high


def test_intervals_cover_the_expected_value_over_fresh_draws() -> None:
    """Against the truth: 30 fresh pairs of sets from two fixed Gaussians, fewer rows than
    dimensions. The intervals cover the mean of the measure over the pairs (its expected value
    at these sizes) about always, and are at most twice as wide as the spread over the pairs
    says a 95% interval is (the bootstrap errs wide: a draw's repeated rows add noise)."""
    generator = np.random.default_rng(17)
    pairs = [(generator.standard_normal((40, 32)),
              generator.standard_normal((40, 32)) * 1.2 + 0.2) for _ in range(30)]  # fmt: skip

    def kid(a: np.ndarray, b: np.ndarray) -> float:
        return kernel_inception_distance(a, b)[0]

    for measure, interval in ((frechet_distance, fd_interval), (kid, kid_interval)):
        values = np.array([measure(a, b) for a, b in pairs])
        intervals = np.array([interval(a, b, resamples=100, seed=s)
                              for s, (a, b) in enumerate(pairs)])  # fmt: skip
        covered = (intervals[:, 0] <= values.mean()) & (values.mean() <= intervals[:, 1])
        assert covered.sum() >= 27
        normal_width = 2 * 1.96 * values.std(ddof=1)
        assert 0.8 < (intervals[:, 1] - intervals[:, 0]).mean() / normal_width < 2.0


def test_wilson_interval_matches_published_values() -> None:
    assert proportion_ci(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert proportion_ci(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert proportion_ci(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert proportion_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        proportion_ci(3, 2)


def test_pca_2d_finds_the_axis_that_separates_the_sets() -> None:
    generator = np.random.default_rng(12)
    a = generator.standard_normal((300, 10))
    b = generator.standard_normal((200, 10))
    b[:, 3] += 8.0  # the sets differ along one axis only
    projected_a, projected_b, ratios = pca_2d(a, b)
    assert projected_a.shape == (300, 2) and projected_b.shape == (200, 2)
    # var along the shift: 1 + (0.6 * 0.4) * 8^2 of about 10 + 0.24 * 64 in all
    assert ratios[0] == pytest.approx(16.36 / 25.36, abs=0.05) and sum(ratios) < 1
    assert abs(projected_a[:, 0].mean() - projected_b[:, 0].mean()) > 7.0
