"""Reading a run's features from a warm cache: the worker's `FeatureBank.get` (float16 rows in
binary, each vector put straight into its rows of the result) against the way it read them
before 2026-12-02 (float32 rows through the ORM's IN queries, bytea as hex text, every vector
kept as bytes in a dict per transform, then stacked), in one run; and a later run of a grid on
the same worker, served by its memo. The cache is PostgreSQL, filled by the benchmark with the
same random vectors of EfficientNet-Lite0's size (2 x 1280) twice: as float32 for the baseline,
as float16 as they are stored now. Each arm runs in a fresh subprocess, so its peak memory is
its own. Prints seconds, peak RSS above the arm's start (the memo arm's memo is filled before
it starts), and the ratios; the arms must agree on the values (the baseline's rounded to
float16).

    python -m bench.features                      # 20,000 images x 4 augmented views
    python -m bench.features --images 60000       # nearer a paper-size run (the paper's largest
                                                  # k has 154k children x 4 views)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psycopg
import torch
from sqlalchemy import select

from app.config import Settings
from app.db.session import make_engine, session_factory
from app.db.tables import Base, FeatureCache
from app.experiments import features as feature_cache
from app.experiments.mixtures import ImageRef
from bench.manifest import PG_ADMIN_DSN, create_database, drop_database

ROOT = Path(__file__).resolve().parents[1]
DIM = 2 * 1280
BACKBONE = "bench-features"  # float16 rows, as stored now
BEFORE = "bench-features-float32"  # the same vectors as float32, as stored before
INSERT_ROWS = 500


def transforms(views: int) -> list[str]:
    return [f"bench-view-{v}" for v in range(views)]


def image_refs(n: int) -> list[ImageRef]:
    return [
        ImageRef(id=str(i), sha256=f"{i:064x}", condition="c", storage_key=f"k/{i}")
        for i in range(n)
    ]


def fill(database: str, *, images: int, views: int) -> None:
    """images x views random vectors in feature_cache, inserted in batches: under BACKBONE as
    float16 and under BEFORE as float32."""
    rng = np.random.default_rng(0)
    dsn = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{database}"
    statement = (
        "INSERT INTO feature_cache (sha256, backbone, transform, dim, vector, created_at) "
        "VALUES (%s, %s, %s, %s, %s, now())"
    )
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        for transform in transforms(views):
            for start in range(0, images, INSERT_ROWS):
                stop = min(start + INSERT_ROWS, images)
                block = rng.standard_normal((stop - start, DIM), dtype=np.float32)
                for backbone, dtype in ((BACKBONE, "<f2"), (BEFORE, "<f4")):
                    cursor.executemany(
                        statement,
                        [
                            (f"{i:064x}", backbone, transform, DIM,
                             block[i - start].astype(dtype).tobytes())
                            for i in range(start, stop)
                        ],
                    )  # fmt: skip
            conn.commit()


def naive_get(settings: Settings, images: list[ImageRef], names: list[str]) -> dict[str, Any]:
    """The read as FeatureBank.get did it before: the ORM's IN queries (bytea as hex text on
    PostgreSQL), every vector kept as bytes in a dict, then one stack per transform."""
    make_session = session_factory(settings.database_url)
    unique = sorted({i.sha256 for i in images})
    found: dict[str, dict[str, bytes]] = {name: {} for name in names}
    with make_session() as session:
        for name in names:
            for start in range(0, len(unique), feature_cache.LOOKUP_BATCH):
                rows = session.execute(
                    select(FeatureCache.sha256, FeatureCache.vector).where(
                        FeatureCache.backbone == BEFORE,
                        FeatureCache.transform == name,
                        FeatureCache.sha256.in_(unique[start : start + feature_cache.LOOKUP_BATCH]),
                    )
                )
                found[name].update({sha: bytes(vector) for sha, vector in rows})
    return {
        name: torch.from_numpy(
            np.stack([np.frombuffer(found[name][i.sha256], dtype="<f4") for i in images])
        ).float()
        for name in names
    }


def reset_peak() -> None:
    """Start the kernel's peak-RSS count (VmHWM) from now (Linux 4.0+; else from the start)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(arm: str, database_url: str, images: int, views: int) -> None:
    """One arm in this process: print its numbers as JSON."""
    from workers.feature_bank import FeatureBank, FeatureMemo

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=database_url, storage_backend="local", storage_dir=Path(tmp)
        )
        refs = image_refs(images)
        names = transforms(views)
        stand_in: Any = SimpleNamespace(
            cache_key=BACKBONE, feature_dim=DIM // 2, device=torch.device("cpu")
        )
        # "memo": a later run of a grid on the same worker (the first run filled the memo)
        memo = FeatureMemo(2**40 if arm == "memo" else 0)
        if arm == "memo":
            FeatureBank(settings, stand_in, size=224, check=lambda: None, memo=memo).get(
                refs, names
            )
        bank = FeatureBank(settings, stand_in, size=224, check=lambda: None, memo=memo)
        reset_peak()
        start_mb = status_mb("VmRSS")
        started = time.perf_counter()
        read = partial(naive_get, settings) if arm == "naive" else bank.get
        result = read(refs, names)
        seconds = time.perf_counter() - started
        peak = status_mb("VmHWM") - start_mb
        # on the values as float16: the baseline's float32 rounded as they are stored now
        checksum = float(
            sum(t[:: max(1, images // 97)].half().double().sum() for t in result.values())
        )
        shapes = [list(t.shape) for t in result.values()]
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "checksum": checksum,
                      "shapes": shapes, "computed": bank.computed,
                      "remembered": bank.remembered, "memo_mb": memo.used / 2**20}))  # fmt: skip


def run_arm(arm: str, database_url: str, images: int, views: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.features", "--child", arm, "--database-url",
               database_url, "--images", str(images), "--views", str(views)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--views", type=int, default=4, help="Transforms per image.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    parser.add_argument("--child", choices=["streaming", "naive", "memo"], help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.database_url, args.images, args.views)
        return

    name, url = create_database()
    try:
        Base.metadata.create_all(make_engine(url))
        vectors_mb = args.images * args.views * DIM * 2 / 2**20
        print(f"filling {args.images} images x {args.views} views ({vectors_mb:.0f} MB of "
              f"float16 vectors, and {2 * vectors_mb:.0f} MB of the same as float32) into a "
              "fresh PostgreSQL database ...", flush=True)  # fmt: skip
        started = time.perf_counter()
        fill(name, images=args.images, views=args.views)
        print(f"filled in {time.perf_counter() - started:.0f} s", flush=True)
        naive = run_arm("naive", url, args.images, args.views)
        streaming = run_arm("streaming", url, args.images, args.views)
        memo = run_arm("memo", url, args.images, args.views)
    finally:
        drop_database(name)
    for arm in (streaming, memo):
        if arm["checksum"] != naive["checksum"] or arm["shapes"] != naive["shapes"]:
            raise SystemExit(f"the arms disagree: {naive} vs {arm}")
        if arm["computed"]:
            raise SystemExit("the cache was not warm: the bank computed vectors")
    if memo["remembered"] != args.images * args.views:
        raise SystemExit(f"the memo did not serve the later run: {memo}")
    rows = (("before (bytes, then stack)", naive), ("FeatureBank.get, database", streaming),
            ("a later run, worker's memo", memo))  # fmt: skip
    for label, arm in rows:
        print(f"{label:>27}: {arm['seconds']:6.2f} s, peak {arm['peak_mb']:7.0f} MB above start")
    print(f"a run's read: {naive['seconds'] / streaming['seconds']:.2f}x faster, "
          f"{naive['peak_mb'] / streaming['peak_mb']:.2f}x less memory "
          f"(the result itself: {vectors_mb:.0f} MB)")  # fmt: skip
    print(f"a later run on the same worker: {naive['seconds'] / memo['seconds']:.1f}x faster "
          f"than before, {streaming['seconds'] / memo['seconds']:.1f}x faster than from the "
          f"database; the memo holds {memo['memo_mb']:.0f} MB")  # fmt: skip
    if args.json:
        record = {"images": args.images, "views": args.views, "vectors_mb": vectors_mb,
                  "naive": naive, "streaming": streaming, "memo": memo}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
