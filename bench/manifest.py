"""Manifest streaming: a million image rows through `GET /datasets/{id}/manifest` as JSON
lines, CSV and Parquet, timed from the client, with the API's peak memory (RSS) sampled from
outside, against the naive way (the baseline) measured in the same run.

    python -m bench.manifest                       # 1,000,000 rows, local store (signed API URLs)
    python -m bench.manifest --s3                  # presigned S3 URLs (moto's S3 server)
    python -m bench.manifest --rows 100000 --formats jsonl

It makes a fresh PostgreSQL database (dropped at the end), migrates it, bulk-inserts the rows
with COPY, serves the API with uvicorn in a subprocess (so its RSS is its own) and streams each
format with httpx. The baseline is the naive way, in a subprocess too: every row loaded as an
ORM object into one list, then one dict, one `store.url` and one `json.dumps` per row.
Targets (the datasets issue): each format in under 10 s, the API under 300 MB RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("SYNTHDERM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGET_SECONDS = 10.0
TARGET_RSS_MB = 300.0
CONDITIONS = (
    "psoriasis", "lichen-planus", "basal-cell-carcinoma", "squamous-cell-carcinoma",
    "allergic-contact-dermatitis", "eczema", "acne-vulgaris", "melanoma",
    "folliculitis", "sarcoidosis",
)  # fmt: skip
COPY_COLUMNS = (
    "id", "dataset_id", "job_id", "index", "source", "condition", "skin_tone",
    "skin_tone_group", "split", "labels", "original_name", "strategy", "model_id", "prompt",
    "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "sha256",
    "size_bytes", "storage_key", "parent_image_id", "provenance", "created_at",
)  # fmt: skip
GROUPS = {1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV", 5: "V-VI", 6: "V-VI"}


# --- the database -------------------------------------------------------------------------


def create_database() -> tuple[str, str]:
    """A fresh PostgreSQL database: (its name, its SQLAlchemy URL)."""
    name = f"synthderm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rows(dataset_id: str, job_id: str, n: int) -> Iterator[tuple[Any, ...]]:
    """n image rows: a fifth real (split, labels, a file name; some with a group only), the
    rest synthetic children of those, with a generation job's provenance."""
    rng = random.Random(0)
    created = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    real_ids: list[str] = []
    provenance = json.dumps(
        {
            "model_id": "tiny-random",
            "model_path": "/srv/synthderm/models/tiny-random",
            "weights_sha256": hashlib.sha256(b"weights").hexdigest(),
            "pipeline_class": "StableDiffusionPipeline",
            "scheduler": "DPMSolverMultistepScheduler",
            "device": "cuda:0",
            "dtype": "float16",
            "diffusers_version": "0.42.1",
            "torch_version": "2.13.0",
            "batch_size": 16,
            "worker": "gpu-1@node-7",
        }
    )
    for index in range(n):
        image_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        condition = CONDITIONS[index % len(CONDITIONS)]
        key = f"datasets/{dataset_id}/{condition}/{image_id}.png"
        sha = hashlib.sha256(image_id.encode()).hexdigest()
        at = created + timedelta(microseconds=index * 997)
        if index % 5 == 0:
            tone = rng.choice((1, 2, 3, 4, 5, 6, None))
            group = rng.choice(("I-II", "V-VI", None)) if tone is None else None
            labels = json.dumps({"md5hash": sha[:32], "fitzpatrick_scale": str(tone or -1)})
            split = ("train", "train", "validation", "test")[index % 4]
            real_ids.append(image_id)
            yield (
                image_id, dataset_id, None, None, "real", condition, tone, group, split,
                labels, f"{sha[:32]}.jpg", None, None, None, None, None, None, None, 512, 512,
                sha, 120_000 + index % 5000, key, None, "{}", at,
            )  # fmt: skip
        else:
            tone = 1 + index % 6
            prompt = f"An image of {condition.replace('-', ' ')}, a skin disease, "
            prompt += f"Fitzpatrick skin type {tone}"
            yield (
                image_id, dataset_id, job_id, index, "synthetic", condition, tone, None, None,
                None, None, "inpaint", "tiny-random", prompt, None, rng.getrandbits(63), 50,
                3.0, 512, 512, sha, 380_000 + index % 9000, key, rng.choice(real_ids),
                provenance, at,
            )  # fmt: skip


def fill(settings: Settings, n: int) -> tuple[str, str]:
    """An owner key, a dataset, a job and n images (COPY); returns (raw key, dataset id)."""
    from app.db.session import session_scope
    from app.db.tables import Dataset, Job
    from app.keys import create_key

    with session_scope(settings.database_url) as session:
        owner, raw = create_key(session=session, name="bench")
        dataset = Dataset(id=str(uuid.uuid4()), owner_id=owner.id, name="bench", kind="synthetic")
        session.add(dataset)
        session.flush()
        job = Job(
            id=str(uuid.uuid4()), owner_id=owner.id, dataset_id=dataset.id, kind="generate",
            status="succeeded", condition="psoriasis", strategy="inpaint", count=n, seed=1,
            chunk_size=64, params={}, done=n,
        )  # fmt: skip
        session.add(job)
        dataset_id, job_id = dataset.id, job.id
    dsn = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY images ({', '.join(COPY_COLUMNS)}) FROM STDIN") as copy:
            for row in _rows(dataset_id, job_id, n):
                copy.write_row(row)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE images")
    return raw, dataset_id


# --- the API process and its memory -------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHDERM_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"SYNTHDERM_{name.upper()}"] = str(value)
    return env


class PeakRss:
    """The peak resident memory of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.05)

    def current_mb(self) -> float:
        return float(self.process.memory_info().rss) / 2**20

    def reset(self) -> None:
        self.peak = self.process.memory_info().rss

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    output = log.open("wb")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=settings_env(settings), stdout=output, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the API did not start in 60 s")


# --- measurements -------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    rows: int
    seconds: float
    peak_mb: float
    megabytes: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def verdict(self, expected_rows: int) -> str:
        ok = (
            self.rows == expected_rows
            and self.seconds < TARGET_SECONDS
            and self.peak_mb < TARGET_RSS_MB
        )
        return "PASS" if ok else "FAIL"


def stream_manifest(
    client: httpx.Client, dataset_id: str, fmt: str, rss: PeakRss, out_dir: Path
) -> tuple[Result, Path | None]:
    """Stream one format to the end; count its rows (Parquet: from the file's footer)."""
    rss.reset()
    newlines = 0
    size = 0
    path = out_dir / f"manifest.{fmt}"
    started = time.perf_counter()
    with (
        client.stream("GET", f"/datasets/{dataset_id}/manifest", params={"format": fmt}) as resp,
        path.open("wb") if fmt == "parquet" else open(os.devnull, "wb") as sink,
    ):
        resp.raise_for_status()
        for chunk in resp.iter_raw(1 << 20):
            size += len(chunk)
            if fmt == "parquet":
                sink.write(chunk)
            else:
                newlines += chunk.count(b"\n")
    seconds = time.perf_counter() - started
    peak = rss.peak_mb
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    else:
        rows = newlines - (1 if fmt == "csv" else 0)  # the CSV header line
    return Result(fmt, rows, seconds, peak, size / 2**20), path if fmt == "parquet" else None


def naive_child(settings: Settings, dataset_id: str) -> None:
    """The baseline, run in its own process: every row as an ORM object in one list, then
    one dict, one store.url and one json.dumps per row (written nowhere)."""
    from sqlalchemy import select

    from app.db.session import session_factory
    from app.db.tables import Image
    from app.storage import make_store

    store = make_store(settings)
    with session_factory(settings.database_url)() as session:
        images = list(session.scalars(select(Image).where(Image.dataset_id == dataset_id)))
        count = 0
        sink = open(os.devnull, "w")  # noqa: SIM115
        for image in images:
            row = {
                "image_id": image.id, "dataset_id": image.dataset_id,
                "url": store.url(image.storage_key), "sha256": image.sha256,
                "size_bytes": image.size_bytes, "condition": image.condition,
                "skin_tone": image.skin_tone, "source": image.source,
                "strategy": image.strategy, "model": image.model_id, "seed": image.seed,
                "steps": image.steps, "guidance_scale": image.guidance_scale,
                "prompt": image.prompt, "negative_prompt": image.negative_prompt,
                "parent_image_id": image.parent_image_id, "width": image.width,
                "height": image.height, "job_id": image.job_id,
                "storage_key": image.storage_key, "created_at": image.created_at.isoformat(),
                "split": image.split, "skin_tone_group": image.skin_tone_group,
                "labels": image.labels, "original_name": image.original_name,
            }  # fmt: skip
            sink.write(json.dumps(row) + "\n")
            count += 1
            if count % 10_000 == 0:
                print(f"rows {count}", flush=True)
        print(f"rows {count}", flush=True)


def run_naive(settings: Settings, dataset_id: str, timeout_s: float) -> Result:
    """Time the baseline in a subprocess; stopped after timeout_s (rows/s from its progress)."""
    command = [sys.executable, "-m", "bench.manifest", "--naive-child", dataset_id]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=settings_env(settings), stdout=subprocess.PIPE, text=True
    )
    rss = PeakRss(proc.pid)
    rows = 0
    assert proc.stdout is not None

    def read() -> None:
        nonlocal rows
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("rows "):
                rows = int(line.split()[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    seconds = time.perf_counter() - started
    reader.join(timeout=5)
    rss.stop()
    return Result("naive", rows, seconds, rss.peak_mb, 0.0)


def check_urls(client: httpx.Client, dataset_id: str, objects: dict[str, bytes]) -> int:
    """Download the URLs of the rows that have objects; returns how many matched."""
    ok = 0
    response = client.get(f"/datasets/{dataset_id}/manifest", params={"limit": 5})
    for line in response.text.splitlines():
        row = json.loads(line)
        if row["image_id"] in objects:
            data = httpx.get(row["url"], timeout=30).content
            ok += (
                hashlib.sha256(data).hexdigest()
                == row["sha256"]
                == (hashlib.sha256(objects[row["image_id"]]).hexdigest())
            )
    return ok


def put_first_objects(settings: Settings, dataset_id: str, n: int) -> dict[str, bytes]:
    """Objects for the first n rows (by id), whose sha256 the rows are updated to."""
    from sqlalchemy import select, update

    from app.db.session import session_scope
    from app.db.tables import Image
    from app.storage import make_store

    store = make_store(settings)
    objects: dict[str, bytes] = {}
    with session_scope(settings.database_url) as session:
        first = session.execute(
            select(Image.id, Image.storage_key)
            .where(Image.dataset_id == dataset_id)
            .order_by(Image.id)
            .limit(n)
        ).all()
        for image_id, key in first:
            data = os.urandom(1000)
            store.put_bytes(key, data, content_type="image/png")
            objects[image_id] = data
            session.execute(
                update(Image)
                .where(Image.id == image_id)
                .values(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
            )
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--formats", default="jsonl,csv,parquet")
    parser.add_argument("--s3", action="store_true", help="S3 store (moto) and presigned URLs")
    parser.add_argument(
        "--batch-rows", type=int, help="SYNTHDERM_MANIFEST_BATCH_ROWS (default: the setting's)"
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-timeout", type=float, default=300.0)
    parser.add_argument("--naive-child", metavar="DATASET_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child:
        naive_child(Settings(), args.naive_child)
        return

    from app.cli import upgrade_database

    db_name, db_url = create_database()
    moto = None
    api = None
    try:
        with tempfile.TemporaryDirectory(prefix="synthderm-bench-") as tmp:
            tmp_path = Path(tmp)
            port = free_port()
            extra: dict[str, Any] = {}
            if args.s3:
                import logging

                from moto.server import ThreadedMotoServer

                logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
                moto_port = free_port()
                moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
                moto.start()
                extra = {
                    "storage_backend": "s3",
                    "s3_endpoint_url": f"http://127.0.0.1:{moto_port}",
                    "s3_bucket": "synthderm-bench",
                    "s3_access_key_id": "bench",
                    "s3_secret_access_key": "bench-secret",
                }
            if args.batch_rows:
                extra["manifest_batch_rows"] = args.batch_rows
            settings = Settings(
                data_dir=tmp_path,
                database_url=db_url,
                public_base_url=f"http://127.0.0.1:{port}",
                signing_secret="bench-secret",
                models_dir=tmp_path / "models",
                **extra,
            )
            upgrade_database(settings)
            started = time.perf_counter()
            raw_key, dataset_id = fill(settings, args.rows)
            objects = put_first_objects(settings, dataset_id, 3)
            fill_s = time.perf_counter() - started
            print(f"inserted {args.rows:,} rows in {fill_s:.1f} s (COPY)")

            api = start_api(settings, port, tmp_path / "api.log")
            rss = PeakRss(api.pid)
            idle_mb = rss.current_mb()
            headers = {"Authorization": f"Bearer {raw_key}"}
            results: list[Result] = []
            with httpx.Client(
                base_url=settings.public_base_url, headers=headers, timeout=None
            ) as client:
                ok = check_urls(client, dataset_id, objects)
                print(f"URLs checked: {ok}/{len(objects)} download bytes matching sha256")
                for fmt in args.formats.split(","):
                    result, _path = stream_manifest(client, dataset_id, fmt, rss, tmp_path)
                    results.append(result)
                    if _path is not None:
                        _path.unlink()
            rss.stop()
            naive = None
            if not args.no_baseline:
                naive = run_naive(settings, dataset_id, args.baseline_timeout)

            backend = "s3 (moto, presigned URLs)" if args.s3 else "local (HMAC-signed API URLs)"
            print()
            print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
            print(
                f"rows: {args.rows:,}; store: {backend}; manifest_batch_rows "
                f"{settings.manifest_batch_rows}; API idle RSS {idle_mb:.0f} MB"
            )
            print(
                f"{'format':<8} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'MB sent':>8} "
                f"{'peak RSS MB':>12}  verdict (< {TARGET_SECONDS:g} s, < {TARGET_RSS_MB:g} MB)"
            )
            for r in results:
                print(
                    f"{r.name:<8} {r.rows:>10,} {r.seconds:>8.2f} {r.rows_per_s:>10,.0f} "
                    f"{r.megabytes:>8.0f} {r.peak_mb:>12.0f}  {r.verdict(args.rows)}"
                )
            if naive is not None:
                print(
                    f"{'naive':<8} {naive.rows:>10,} {naive.seconds:>8.2f} "
                    f"{naive.rows_per_s:>10,.0f} {'':>8} {naive.peak_mb:>12.0f}  "
                    "baseline: ORM list of every row, dict + store.url + json.dumps per row"
                    + ("" if naive.rows == args.rows else " (stopped at the timeout)")
                )
                for r in results:
                    if naive.rows_per_s:
                        print(f"{r.name}: {r.rows_per_s / naive.rows_per_s:.1f}x the baseline")
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                api.kill()
        if moto is not None:
            moto.stop()
        drop_database(db_name)


if __name__ == "__main__":
    main()
