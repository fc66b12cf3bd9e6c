"""The embedded broker after many messages: N no-op Celery tasks sent through the SQLite
broker to a consuming worker process, then, with the worker idle for ~20 s, its CPU share
(psutil), the time of an empty poll and the broker file's size; against kombu's stock
SQLAlchemy transport (the baseline: same file layout, same worker, same settings) measured in
the same run.

    python -m bench.broker                     # 50,000 tasks per arm, 20 s idle
    python -m bench.broker --count 2000 --idle 5

Each arm gets its own file in a temporary folder and its own worker (`--pool solo`, the
service's Celery settings: acks_late, prefetch 1, polling 0.1 s); tasks are sent while the
worker consumes. Before (issue 21): kombu hid delivered rows and kept them, so the file, the
empty poll and the idle worker's CPU grew with every message ever sent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any

import kombu.transport
import psutil
from celery import Celery
from kombu import Connection
from kombu.transport import sqlalchemy as kombu_sqla

from app.broker import GPU_QUEUE, celery_config
from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
NOOP_TASK = "bench.broker.noop"
ARMS = {"kombu stock (before)": "sqlastock+sqlite", "embedded (now)": "sqlitewal+sqlite"}
POLLING_INTERVAL_S = 0.1


class StockTransport(kombu_sqla.Transport):
    """kombu's transport as it is; the polling interval set here, since kombu's own passes
    every transport option (polling_interval too) to create_engine."""

    polling_interval = POLLING_INTERVAL_S


kombu.transport.TRANSPORT_ALIASES["sqlastock"] = "bench.broker:StockTransport"


def noop(i: int) -> None:
    """The task: nothing."""


def make_app(url: str) -> Celery:
    settings = Settings(
        broker_url="sqlitewal+sqlite:///unused.sqlite", broker_polling_interval_s=POLLING_INTERVAL_S
    )
    config = celery_config(settings)
    config["broker_url"] = url
    if not url.startswith("sqlitewal+"):
        config["broker_transport_options"] = {}
    config["task_routes"] = {NOOP_TASK: {"queue": GPU_QUEUE}}
    app = Celery("bench-broker")
    app.conf.update(config)
    app.task(name=NOOP_TASK)(noop)
    return app


def run_worker(url: str) -> None:
    make_app(url).worker_main(
        ["worker", "-Q", GPU_QUEUE, "--pool", "solo", "--concurrency", "1", "--loglevel",
         "WARNING", "--without-heartbeat", "--without-mingle", "--without-gossip"]
    )  # fmt: skip


def rows(path: Path, where: str = "1") -> int:
    try:
        with sqlite3.connect(path, timeout=30) as db:
            sql = f"SELECT count(*) FROM kombu_message WHERE {where}"
            return int(db.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return -1


def empty_poll_ms(url: str, polls: int = 50) -> float:
    with Connection(url) as connection:
        channel = connection.default_channel
        channel._get_or_create(GPU_QUEUE)
        times = []
        for _ in range(polls):
            start = time.perf_counter()
            with contextlib.suppress(Empty):
                channel._get(GPU_QUEUE)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_arm(scheme: str, folder: Path, count: int, idle_s: float) -> dict[str, Any]:
    path = folder / "broker.sqlite"
    url = f"{scheme}:///{path.as_posix()}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "bench.broker", "--worker", url],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        app = make_app(url)
        start = time.perf_counter()
        for i in range(count):
            app.send_task(NOOP_TASK, kwargs={"i": i}, queue=GPU_QUEUE)
        sent = time.perf_counter() - start
        while rows(path, "visible = 1") != 0:
            if worker.poll() is not None:
                raise RuntimeError(worker.stderr.read().decode() if worker.stderr else "died")
            time.sleep(0.2)
        drained = time.perf_counter() - start
        time.sleep(2.0)  # the last ack
        process = psutil.Process(worker.pid)
        cpu0, wall0 = process.cpu_times(), time.perf_counter()
        time.sleep(idle_s)
        cpu1, wall1 = process.cpu_times(), time.perf_counter()
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        return {
            "sent_s": sent,
            "drained_s": drained,
            "cpu_pct": 100 * busy / (wall1 - wall0),
            "poll_ms": empty_poll_ms(url),
            "file_mb": path.stat().st_size / 1e6,
            "wal_mb": sum(p.stat().st_size for p in folder.glob("broker.sqlite-wal")) / 1e6,
            "rows": rows(path),
        }
    finally:
        worker.terminate()
        worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000, help="tasks per arm")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the worker idles")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.count:,} no-op tasks per arm, worker idle {args.idle:.0f} s")  # fmt: skip
    results = {}
    for name, scheme in ARMS.items():
        with tempfile.TemporaryDirectory(prefix="bench-broker-") as folder:
            results[name] = run_arm(scheme, Path(folder), args.count, args.idle)
    header = (
        "| arm | send s | drained s | rows left | file MB (+WAL) | empty poll ms | idle CPU % |"
    )
    print(header)
    print("|---" * 7 + "|")
    for name, r in results.items():
        print(
            f"| {name} | {r['sent_s']:.1f} | {r['drained_s']:.1f} | {r['rows']:,} | "
            f"{r['file_mb']:.2f} (+{r['wal_mb']:.2f}) | {r['poll_ms']:.2f} | {r['cpu_pct']:.1f} |"
        )
    before, now = results["kombu stock (before)"], results["embedded (now)"]
    print(
        f"ratio before/now: file {before['file_mb'] / max(now['file_mb'], 1e-9):.1f}x, "
        f"empty poll {before['poll_ms'] / max(now['poll_ms'], 1e-9):.1f}x, "
        f"idle CPU {before['cpu_pct'] / max(now['cpu_pct'], 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
