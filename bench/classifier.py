"""Classifier grid speed: the paper's dose-response grid (2 n_real x 4 k x 2 augmentation
settings, x seeds) trained through the worker's own code (workers.train.fit_split) twice in
one run: without the feature cache (the paper's path: every batch of every epoch through the
frozen backbone) and with it (each image's features computed once, then only heads train).
Prints the wall time of each, the ratio, and the mean accuracy of each arm.

    python -m bench.classifier                       # CPU scale: 3 classes, n_real 4,8, k 1..4
    python -m bench.classifier --paper               # the paper's n_real 128,228, k 10,25,50,75
    python -m bench.classifier --save-data .benchdata   # copy the grid's photos, for a GPU box
    python -m bench.classifier --data .benchdata        # ... and read them from there

Real images come from ../shared/data (Fitzpatrick17k); the synthetic children are perturbed
copies of their parents (random crop, colour, flip): the benchmark times training, not
generation. Both arms start from an empty cache.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from app.config import Settings
from app.db.session import make_engine
from app.db.tables import Base
from app.experiments.mixtures import ImageRef, build_split
from app.storage import LocalStore

# fit_split's timings: features (the cache, or the test set's on the uncached path), the
# head's epochs (with every batch through the body on the uncached path), test metrics
PHASES = ("features_s", "train_s", "evaluate_s")
FITZPATRICK = Path(__file__).resolve().parents[2] / "shared" / "data" / "fitzpatrick17k_ajl21"


def chosen_rows(data: Path, *, classes: int, per_class: int) -> list[dict[str, str]]:
    """The metadata rows of the commonest `classes` conditions, the first `per_class` of each
    by path: the same rows from the full folder and from a copy --save-data made of them."""
    with (data / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    chosen = sorted(counts, key=lambda c: (-counts[c], c))[:classes]
    return [
        row
        for condition in sorted(chosen)
        for row in sorted((r for r in rows if r["label"] == condition), key=lambda r: r["path"])[
            :per_class
        ]
    ]


def save_data(source: Path, target: Path, rows: list[dict[str, str]]) -> int:
    """Copy the photos of `rows` and their metadata.csv to `target` (for a machine without
    ../shared/data, e.g. a lent GPU: carry the folder); returns the bytes copied."""
    copied = 0
    for row in rows:
        path = target / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        copied += path.write_bytes((source / row["path"]).read_bytes())
    with (target / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return copied


def real_images(store: LocalStore, data: Path, *, classes: int, per_class: int) -> list[ImageRef]:
    """The commonest `classes` conditions of the Fitzpatrick17k photos, `per_class` each."""
    images = []
    for row in chosen_rows(data, classes=classes, per_class=per_class):
        photo = (data / row["path"]).read_bytes()
        sha = hashlib.sha256(photo).hexdigest()
        key = f"bench/real/{sha}.jpg"
        store.put_bytes(key, photo, content_type="image/jpeg")
        tone = int(row["fitzpatrick_scale"])
        images.append(ImageRef(id=sha, sha256=sha, condition=row["label"], storage_key=key,
                               skin_tone=tone if tone > 0 else None))  # fmt: skip
    return images


def child_of(parent: bytes, seed: int) -> bytes:
    """A perturbed copy of a parent: what the benchmark trains on as a synthetic child."""
    rng = random.Random(seed)
    image = Image.open(io.BytesIO(parent)).convert("RGB")
    w, h = image.size
    scale = rng.uniform(0.8, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def children_of(store: LocalStore, parents: list[ImageRef], k: int) -> list[ImageRef]:
    children = []
    for parent in parents:
        data = store.get_bytes(parent.storage_key)
        for j in range(k):
            child = child_of(data, int(parent.sha256[:8], 16) + j)
            sha = hashlib.sha256(child).hexdigest()
            key = f"bench/synthetic/{sha}.jpg"
            store.put_bytes(key, child, content_type="image/jpeg")
            children.append(ImageRef(id=f"{parent.id}-{j}", sha256=sha,
                                     condition=parent.condition, storage_key=key,
                                     parent_image_id=parent.id, strategy="inpaint"))  # fmt: skip
    return children


def run_grid(
    settings: Settings,
    *,
    pool: list[ImageRef],
    test: list[ImageRef],
    children: list[ImageRef],
    classes: list[str],
    grid: list[dict[str, Any]],
    base_config: dict[str, Any],
    cache: bool,
) -> tuple[float, list[float], int, dict[str, float]]:
    """Every run of the grid through the worker's fit_split: (seconds, top-1 per run, images
    run through the backbone, seconds per phase summed over the runs)."""
    from workers.train import fit_split

    parent_sha = {p.id: p.sha256 for p in pool}
    accuracies, forwards = [], 0
    phases = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    for point in grid:
        config = {**base_config, **point, "cache_features": cache}
        split = build_split(
            pool=pool, test=test, children=children, parent_sha256=parent_sha, classes=classes,
            validation_per_class=config["validation_per_class"],
            n_real_per_class=config["n_real_per_class"],
            synthetic_per_real=config["synthetic_per_real"], seed=config["seed"],
        )  # fmt: skip
        values, _rows = fit_split(
            settings, split, config=config, check=lambda: None, on_epoch=lambda e, h: None
        )
        accuracies.append(values["metrics"]["top1"]["value"])
        for phase in PHASES:
            phases[phase] += values["timings"][phase]
        epochs = len(values["history"])
        if cache:
            forwards += values["timings"]["features_computed"]
        else:
            forwards += epochs * (len(split.train) + len(split.validation)) + len(split.test)
        print(
            f"  {'cached  ' if cache else 'uncached'} n_real={point['n_real_per_class']:>3} "
            f"k={point['synthetic_per_real']:>2} aug={point['augmentation']!s:<5} "
            f"seed={point['seed']} epochs={epochs:>2} top-1={accuracies[-1]:.3f} "
            f"t={time.perf_counter() - start:.0f}s",
            flush=True,
        )
    return time.perf_counter() - start, accuracies, forwards, phases


def phase_text(phases: dict[str, float]) -> str:
    """The uncached arm's backbone passes happen inside head training (every epoch)."""
    return ", ".join(f"{name.removesuffix('_s')} {sec:.1f} s" for name, sec in phases.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paper", action="store_true", help="The paper's grid (a GPU box).")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--n-real", default=None, help="Two values, e.g. 4,8.")
    parser.add_argument("--k", default=None, help="Four values, e.g. 1,2,3,4.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per setting (service: 3).")
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--views", type=int, default=None, help="Cached augmented views.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    parser.add_argument("--data", type=Path, default=FITZPATRICK, help="The photos' folder.")
    parser.add_argument(
        "--save-data", type=Path, default=None,
        help="Only copy the photos this grid reads (and their metadata.csv) to this folder.",
    )  # fmt: skip
    args = parser.parse_args()
    if not (args.data / "metadata.csv").is_file():
        raise SystemExit(f"the benchmark reads real photos from {args.data}; it is missing")

    classes_n = args.classes or (9 if args.paper else 3)
    n_real = [int(v) for v in (args.n_real or ("128,228" if args.paper else "4,8")).split(",")]
    ks = [int(v) for v in (args.k or ("10,25,50,75" if args.paper else "1,2,3,4")).split(",")]
    validation, test_per_class = (40, 40) if args.paper else (8, 10)
    grid = [
        {"n_real_per_class": n, "synthetic_per_real": k, "augmentation": aug, "seed": seed}
        for n, k, aug, seed in itertools.product(
            n_real, ks, (False, True), range(111108, 111108 + args.seeds)
        )
    ]
    base_config = {
        "backbone": "efficientnet-lite0", "image_size": 224, "max_epochs": args.max_epochs,
        "patience": 3, "learning_rate": 1e-3, "weight_decay": 0.01, "batch_size": None,
        "validation_per_class": validation,
    }  # fmt: skip

    per_class = max(n_real) + validation + test_per_class
    if args.save_data:
        rows = chosen_rows(args.data, classes=classes_n, per_class=per_class)
        size = save_data(args.data, args.save_data, rows)
        print(f"copied {len(rows)} photos ({size / 1e6:.1f} MB) to {args.save_data}; "
              f"run with --data {args.save_data} and the same grid options")  # fmt: skip
        return

    with tempfile.TemporaryDirectory(prefix="synthderm-bench-classifier-") as tmp:
        root = Path(tmp)
        store = LocalStore(root / "store", base_url="http://bench", secret="bench", expiry_s=60)
        images = real_images(store, args.data, classes=classes_n, per_class=per_class)
        classes = sorted({i.condition for i in images})
        rng = random.Random(0)
        test_ids = set()
        for condition in classes:
            members = [i.id for i in images if i.condition == condition]
            test_ids.update(rng.sample(members, test_per_class))
        test = [i for i in images if i.id in test_ids]
        pool = [i for i in images if i.id not in test_ids]
        children = children_of(store, pool, max(ks))
        print(f"{len(pool)} real training-pool images, {len(test)} test, {len(children)} "
              f"children; {len(grid)} runs per arm; classes: {', '.join(classes)}")  # fmt: skip

        timings: dict[str, Any] = {}
        results: dict[bool, tuple[float, list[float], int, dict[str, float]]] = {}
        for cache in (False, True):
            database = root / f"cache-{cache}.sqlite"
            settings = Settings(
                data_dir=root, database_url=f"sqlite:///{database}", storage_backend="local",
                storage_dir=root / "store", device=args.device,
                classifier_augmented_views=args.views or Settings().classifier_augmented_views,
            )  # fmt: skip
            Base.metadata.create_all(make_engine(settings.database_url))
            torch.manual_seed(0)
            results[cache] = run_grid(
                settings, pool=pool, test=test, children=children, classes=classes, grid=grid,
                base_config=base_config, cache=cache,
            )  # fmt: skip
        (slow, slow_acc, slow_fwd, slow_phases) = results[False]
        (fast, fast_acc, fast_fwd, fast_phases) = results[True]
        device = (
            torch.cuda.get_device_name(0)
            if torch.cuda.is_available() and args.device != "cpu"
            else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
        )
        print(f"device: {device}")
        print(f"without the cache: {slow:.1f} s, {slow_fwd} images through the backbone, "
              f"mean top-1 {statistics.mean(slow_acc):.3f}; {phase_text(slow_phases)}")  # fmt: skip
        print(f"with the cache:    {fast:.1f} s, {fast_fwd} images through the backbone, "
              f"mean top-1 {statistics.mean(fast_acc):.3f}; {phase_text(fast_phases)}")  # fmt: skip
        print(f"ratio uncached/cached: {slow / fast:.1f}x")
        timings.update(
            device=device, runs=len(grid), uncached_s=slow, cached_s=fast, ratio=slow / fast,
            uncached_forwards=slow_fwd, cached_forwards=fast_fwd,
            uncached_mean_top1=float(np.mean(slow_acc)), cached_mean_top1=float(np.mean(fast_acc)),
            uncached_phases_s=slow_phases, cached_phases_s=fast_phases,
        )  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(timings, indent=2) + "\n")


if __name__ == "__main__":
    main()
