"""Issue 23's evaluation math at service scale: the memorisation audit's nearest neighbours,
precision/recall/density/coverage, FD and KID of 50,000 synthetic against 4,000 real feature
vectors, plus the real-vs-real floor (FD, KID and prdc between two disjoint halves of the real
set), and the bootstrap intervals of FD and KID at the sizes the service compares them (one
real half against as many synthetic rows, and the floor's two halves), as the service computes
them (models.quality, models.memorisation: chunked float32 products; a bootstrap draw as row
counts) against a naive baseline in the same run: one query at a time in numpy float64 for
the nearest neighbours and every k-NN radius and ball test, textbook FD (eig of S_a S_b) and
KID (three float64 kernel matrices per subset), and each bootstrap draw as a new set of rows.

The features are random but structured (a 64-factor mixture of 20 clusters through a ReLU,
d = 1280 as EfficientNet-Lite0's pooled width, float16 as the feature cache stores them; the
synthetic set is shifted a little and holds 200 planted near-copies of real rows), not real
features. The naive path's per-row parts are timed on --naive-rows rows and EXTRAPOLATED
linearly to the full counts; its KID is timed on --naive-subsets subsets and extrapolated to
100; its intervals on --naive-draws draws and extrapolated to the service's counts. Both paths
are checked to agree on the rows the naive one computes.

    python -m bench.evaluation
    python -m bench.evaluation --synthetic 5000 --real 1000 --naive-rows 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.memorisation import naive_nearest_neighbours, nearest_neighbours
from models.quality import (
    centred_percentile_ci,
    frechet_bootstrap,
    frechet_distance,
    kernel_inception_distance,
    kid_bootstrap,
    knn_radii,
    prdc,
)
from workers.evaluation_measures import FD_BOOTSTRAP_RESAMPLES, KID_BOOTSTRAP_RESAMPLES

K = 5
PLANTED = 200


def structured_features(n: int, *, dim: int, shift: float, seed: int) -> np.ndarray:
    """n post-ReLU-like rows: cluster centres in a 64-d latent space mapped to `dim`, float16."""
    fixed = np.random.default_rng(0)  # the same clusters and map for every set
    basis = fixed.standard_normal((64, dim)) / 8.0
    centres = fixed.standard_normal((20, 64)) * 2.0
    generator = np.random.default_rng(seed)
    latent = centres[generator.integers(0, 20, n)] + generator.standard_normal((n, 64)) + shift
    noise = 0.3 * generator.standard_normal((n, dim), dtype=np.float32)
    return np.maximum(latent.astype(np.float32) @ basis.astype(np.float32) + noise, 0).astype(
        np.float16
    )


def compared_sets(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, ...]:
    """The real set's two halves and as many synthetic rows as a half (seeded), as the service
    compares them (workers.evaluation_measures.fidelity_scope)."""
    halves = np.random.default_rng(1).permutation(len(real))
    half = len(real) // 2
    first, second = real[halves[:half]], real[halves[half : 2 * half]]
    matched = fake[np.sort(np.random.default_rng(2).choice(len(fake), half, replace=False))]
    return first, second, matched


def timed(label: str, seconds: dict[str, float], work: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = work()
    seconds[label] = time.perf_counter() - start
    print(f"  {label:<34} {seconds[label]:8.2f} s", flush=True)
    return result


def service_path(real: np.ndarray, fake: np.ndarray, seconds: dict[str, float]) -> dict:
    first, second, matched = compared_sets(real, fake)
    fd_draws, kid_draws = FD_BOOTSTRAP_RESAMPLES, KID_BOOTSTRAP_RESAMPLES
    return {
        "audit": timed("audit nearest neighbours", seconds, lambda: nearest_neighbours(fake, real)),
        "prdc": timed("prdc", seconds, lambda: prdc(real, fake, k=K)),
        "fd": timed("FD", seconds, lambda: frechet_distance(real, fake)),
        "kid": timed("KID", seconds, lambda: kernel_inception_distance(real, fake)),
        "floor_prdc": timed("floor prdc", seconds, lambda: prdc(first, second, k=K)),
        "floor_fd": timed("floor FD", seconds, lambda: frechet_distance(first, second)),
        "floor_kid": timed("floor KID", seconds, lambda: kernel_inception_distance(first, second)),
        "fd_draws": timed(f"FD interval ({fd_draws} draws)", seconds,
                          lambda: frechet_bootstrap(second, matched, resamples=fd_draws)),
        "kid_draws": timed(f"KID interval ({kid_draws} draws)", seconds,
                           lambda: kid_bootstrap(second, matched, resamples=kid_draws)),
        "floor_fd_draws": timed(f"floor FD interval ({fd_draws} draws)", seconds,
                                lambda: frechet_bootstrap(second, first, resamples=fd_draws)),
        "floor_kid_draws": timed(f"floor KID interval ({kid_draws} draws)", seconds,
                                 lambda: kid_bootstrap(second, first, resamples=kid_draws)),
    }  # fmt: skip


def naive_radii(points: np.ndarray, rows: int) -> np.ndarray:
    """k-th nearest other row's distance, one row at a time (the first `rows` rows)."""
    radii = np.empty(rows)
    for i in range(rows):
        distances = np.linalg.norm(points - points[i], axis=1)
        distances[i] = np.inf
        radii[i] = np.partition(distances, K - 1)[K - 1]
    return radii


def naive_ball_pass(real: np.ndarray, fake: np.ndarray, radii: np.ndarray, rows: int) -> None:
    """The prdc pass over fakes, one fake at a time: its distances to every real, tested against
    the real balls (precision, density, coverage; recall's test is the same work)."""
    covered = np.zeros(len(real), dtype=bool)
    inside = np.empty(rows, dtype=bool)
    for i in range(rows):
        within = np.linalg.norm(real - fake[i], axis=1) <= radii
        inside[i] = within.any()
        covered |= within


def naive_fd(a: np.ndarray, b: np.ndarray) -> float:
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(axis=0) - b.mean(axis=0)
    values = np.linalg.eigvals(cov_a @ cov_b)
    return float(
        diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(values + 0j).real.sum()
    )


def naive_kid_subset(
    a: np.ndarray, b: np.ndarray, size: int, generator: np.random.Generator
) -> float:
    """One subset's unbiased MMD^2, three float64 kernel matrices written out."""
    x = a[generator.choice(len(a), size, replace=False)]
    y = b[generator.choice(len(b), size, replace=False)]
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
    return float(within - 2 * kxy.mean())


def naive_fd_draw(a: np.ndarray, b: np.ndarray, generator: np.random.Generator) -> float:
    """FD of one bootstrap draw: the drawn rows copied out, then textbook FD."""
    return naive_fd(a[generator.integers(0, len(a), len(a))],
                    b[generator.integers(0, len(b), len(b))])  # fmt: skip


def naive_kid_draw(a: np.ndarray, b: np.ndarray, generator: np.random.Generator) -> float:
    """The unbiased MMD^2 of one bootstrap draw of the whole sets, pairs of a row with its own
    repeat left out, three float64 kernel matrices written out."""
    rows_a = generator.integers(0, len(a), len(a))
    rows_b = generator.integers(0, len(b), len(b))
    x, y, d = a[rows_a], b[rows_b], a.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    other_a, other_b = rows_a[:, None] != rows_a, rows_b[:, None] != rows_b
    return float(kxx[other_a].mean() + kyy[other_b].mean() - 2 * kxy.mean())


def naive_path(
    real16: np.ndarray, fake16: np.ndarray, *, rows: int, subsets: int, draws: int,
    seconds: dict[str, float],
) -> dict:  # fmt: skip
    """Each part timed on a sample and extrapolated to the service's counts (printed as such)."""
    real, fake = real16.astype(np.float64), fake16.astype(np.float64)
    half = len(real) // 2
    first, second, matched = compared_sets(real, fake)
    generator = np.random.default_rng(0)
    measured: dict[str, float] = {}

    def part(label: str, work: Callable[[], Any], scale: float) -> Any:
        result = timed(f"{label} (measured)", measured, work)
        seconds[label] = measured[f"{label} (measured)"] * scale
        print(f"  {label:<34} {seconds[label]:8.2f} s extrapolated x{scale:g}", flush=True)
        return result

    audit = part(
        "audit nearest neighbours",
        lambda: naive_nearest_neighbours(fake16[:rows], real16),
        len(fake) / rows,
    )
    radii = part("prdc real radii", lambda: naive_radii(real, rows), len(real) / rows)
    part(
        "prdc fake radii (matched subset)",
        lambda: naive_radii(fake[: len(real)], rows),
        len(real) / rows,
    )
    # the naive radii exist for the timed rows only; a ball test costs the same whatever the
    # radii are, so the pass is timed against unit balls
    part(
        "prdc ball pass",
        lambda: naive_ball_pass(real, fake, np.ones(len(real)), rows),
        len(fake) / rows,
    )
    fd = part("FD", lambda: naive_fd(real, fake), 1)
    size = min(1000, len(real), len(fake))
    part(
        "KID",
        lambda: [naive_kid_subset(real, fake, size, generator) for _ in range(subsets)],
        100 / subsets,
    )
    floor_rows = min(rows, half)
    part("floor prdc radii", lambda: naive_radii(first, floor_rows), 2 * half / floor_rows)
    part(
        "floor prdc ball pass",
        lambda: naive_ball_pass(first, second, np.ones(half), floor_rows),
        half / floor_rows,
    )
    part("floor FD", lambda: naive_fd(first, second), 1)
    # 100 subsets of 1000 from halves of 2000; halves of 1000 or less are whole sets, so one
    # subset, as the service computes it
    floor_size, floor_subsets = (1000, 100) if half > 1000 else (half, 1)
    part(
        "floor KID",
        lambda: naive_kid_subset(first, second, floor_size, generator),
        floor_subsets,
    )
    for label, other in (("", matched), ("floor ", first)):
        part(f"{label}FD interval",
             lambda other=other: [naive_fd_draw(second, other, generator) for _ in range(draws)],
             FD_BOOTSTRAP_RESAMPLES / draws)  # fmt: skip
        part(f"{label}KID interval",
             lambda other=other: [naive_kid_draw(second, other, generator) for _ in range(draws)],
             KID_BOOTSTRAP_RESAMPLES / draws)  # fmt: skip
    return {"audit": audit, "radii": radii, "fd": fd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=50_000)
    parser.add_argument("--real", type=int, default=4_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--naive-rows", type=int, default=1000, help="Rows the naive path times.")
    parser.add_argument("--naive-subsets", type=int, default=5, help="KID subsets it times.")
    parser.add_argument("--naive-draws", type=int, default=2, help="Bootstrap draws it times.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = parser.parse_args()

    real = structured_features(args.real, dim=args.dim, shift=0.0, seed=1)
    fake = structured_features(args.synthetic, dim=args.dim, shift=0.15, seed=2)
    fake[:PLANTED] = real[:PLANTED] + np.float16(0.01)  # planted near-copies
    load_before = os.getloadavg()
    print(f"{args.synthetic} synthetic x {args.real} real, d={args.dim}, float16 features")
    print(
        f"{platform.processor() or 'CPU'}, torch threads {torch.get_num_threads()}, load"
        f" average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )

    service_seconds: dict[str, float] = {}
    print("service path")
    service = service_path(real, fake, service_seconds)
    service_total = sum(service_seconds.values())
    print(f"  {'total':<34} {service_total:8.2f} s")

    naive_seconds: dict[str, float] = {}
    print(f"naive path (per-row parts timed on {args.naive_rows} rows, extrapolated)")
    naive = naive_path(real, fake, rows=args.naive_rows, subsets=args.naive_subsets,
                       draws=args.naive_draws, seconds=naive_seconds)  # fmt: skip
    naive_total = sum(naive_seconds.values())
    print(f"  {'total (extrapolated)':<34} {naive_total:8.2f} s")

    # the two paths agree where the naive one computed
    rows = args.naive_rows
    indices, similarities = service["audit"]
    agree = float((naive["audit"][0] == indices[:rows]).mean())
    sims_error = float(np.abs(naive["audit"][1] - similarities[:rows]).max())
    radii_error = float(np.abs(naive["radii"] / knn_radii(real, k=K)[:rows] - 1).max())
    fd_error = abs(naive["fd"] / service["fd"] - 1)
    planted_found = float((indices[:PLANTED] == np.arange(PLANTED)).mean())
    print(
        f"agreement: neighbours {agree:.4f}, max |sim diff| {sims_error:.2e}, max radius rel"
        f" diff {radii_error:.2e}, FD rel diff {fd_error:.2e}, planted copies found"
        f" {planted_found:.3f}"
    )
    results = {name: service[name] for name in ("fd", "kid", "prdc")}
    results |= {f"floor_{name}": service[f"floor_{name}"] for name in ("fd", "kid", "prdc")}
    # the values at the sizes the service compares, each with its interval (estimates untimed)
    first, second, matched = compared_sets(real, fake)
    for name, other, prefix in (("matched", matched, ""), ("floor", first, "floor_")):
        fd, kid = frechet_distance(second, other), kernel_inception_distance(second, other)[0]
        fd_ci = centred_percentile_ci(service[f"{prefix}fd_draws"], fd, lowest=0.0)
        kid_ci = centred_percentile_ci(service[f"{prefix}kid_draws"], kid)
        results[f"{name}_fd_interval"] = [fd, fd_ci]
        results[f"{name}_kid_interval"] = [kid, kid_ci]
    print("results: " + json.dumps(results))
    load_after = os.getloadavg()
    ratio = naive_total / service_total
    print(
        f"service {service_total:.1f} s, naive {naive_total:.1f} s (extrapolated): {ratio:.1f}x;"
        f" load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    if args.json:
        numbers = {
            "service_seconds": service_seconds,
            "naive_seconds": naive_seconds,
            "service_total": service_total,
            "naive_total": naive_total,
            "ratio": ratio,
            "load_before": load_before,
            "load_after": load_after,
            "agreement": agree,
            "results": results,
        }
        args.json.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
