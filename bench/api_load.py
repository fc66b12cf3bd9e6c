"""POST /jobs under load: requests per second and latency of the API, against a bare FastAPI
endpoint that parses the same body (the baseline), measured in the same run.

    python -m bench.api_load                          # 16 connections, 15 s, every stack
    python -m bench.api_load --seconds 5 --stacks embedded
    python -m bench.api_load --api-workers 2        # uvicorn --workers 2 for the service
    python -m bench.api_load --generator wrk        # wrk (C) as the load generator

Stacks, each the API alone on a fresh data folder, started as `synthderm run --no-with-worker`
starts it (migrations, tiny generators, uvicorn with the service's settings):
- bare: a FastAPI app with one POST /jobs that validates the body as JobCreate and answers 202;
- embedded: the embedded default (SQLite, the SQLite broker, local files);
- postgres+redis: a new PostgreSQL database on 127.0.0.1:5432 and Redis db 15 (flushed).

The load: `--connections` asyncio clients (httpx) each sending POST /jobs with count 1 in a
loop for `--seconds`, after a 5 s warm-up that is not counted (long enough to pass the API's
gc_freeze_after_requests, 1000: the measured seconds are the steady state). Printed per stack:
requests, failures (any status but 202), req/s, p50, p99 and max latency, and the ratio of
req/s to the bare endpoint's. Then, for the service stacks, whether every job was dispatched
at most once and the broker holds exactly the chunks marked dispatched (the window: the
database holds the rest until a worker takes them), and the server's CPU time per request
(psutil).

The load generator shares the machine's cores with the API: on a 2-core machine the httpx
one takes about one of them, so the numbers are the API's on the core that is left.
`--generator wrk` runs wrk (`apt-get install wrk`; one thread, the same connections, body
and warm-up, statuses counted by a Lua script), which needs a few percent of a core for the
same load: the numbers are then the API's on (nearly) the whole machine. Compare a stack only
with the bare endpoint of the same run, which uses the same generator. With wrk, the server's
CPU is counted over the measured seconds only (with httpx, warm-up included, estimated).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from app.schemas import JobCreate

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/15"
BODY = {"condition": "psoriasis", "skin_tone": 5, "strategy": "text-to-image", "count": 1}
# long enough for the API to pass gc_freeze_after_requests (1000) before the measured seconds
WARMUP_S = 5.0

bare_app = FastAPI()


@bare_app.post("/jobs", status_code=202)
def bare_create(body: JobCreate) -> dict[str, Any]:
    """The baseline: the same body parsed by the same model, nothing stored."""
    return {"id": str(uuid.uuid4()), "status": "queued", "count": body.count}


@bare_app.get("/healthz")
def bare_health() -> dict[str, str]:
    return {"status": "ok"}


@dataclass
class Result:
    stack: str
    requests: int
    failures: int
    seconds: float
    latencies_ms: list[float]
    statuses: dict[int, int]
    server_cpu_s: float = 0.0
    # for wrk, which reports percentiles itself (ms) instead of every latency
    percentiles: dict[float, float] | None = None
    cpu_requests: int | None = None  # requests the server CPU was counted over

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float) -> float:
        if self.percentiles is not None:
            return self.percentiles[q]
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"the server did not start in {timeout} s:\n{log.read_text()[-3000:]}")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far (uvicorn's workers are its children)."""
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


@contextlib.contextmanager
def server(command: list[str], env: dict[str, str], url: str, log: Path) -> Iterator[int]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *command], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_serving(url, proc, log)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    import psycopg

    name = f"bench_api_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def load(url: str, key: str | None, connections: int, seconds: float, name: str) -> Result:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures = 0
    start = time.perf_counter()
    counted_from = start + WARMUP_S
    stop = counted_from + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while True:
            sent = time.perf_counter()
            if sent >= stop:
                return
            try:
                response = await client.post("/jobs", json=BODY)
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            took = time.perf_counter() - sent
            if sent >= counted_from:
                latencies.append(took * 1000)
                statuses[status] = statuses.get(status, 0) + 1
                failures += status != 202

    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=30
    ) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(connections)))
    return Result(name, len(latencies), failures, seconds, latencies, statuses)


# wrk's script: POST /jobs with the body and key, each status counted per thread and
# everything printed as one JSON line at the end (latencies in microseconds).
WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  wrk.method = "POST"
  wrk.body = os.getenv("BENCH_BODY")
  wrk.headers["Content-Type"] = "application/json"
  local key = os.getenv("BENCH_KEY")
  if key ~= nil and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
  statuses = {}
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do table.insert(parts, string.format('"%s": %d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "socket_errors": %d, "p50": %d, "p99": %d, '
    .. '"max": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, table.concat(parts, ", ")))
end
"""


def run_wrk(
    url: str, key: str | None, connections: int, seconds: float, script: Path
) -> dict[str, Any]:
    env = {**os.environ, "BENCH_BODY": json.dumps(BODY), "BENCH_KEY": key or ""}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
         "-s", str(script), f"{url}/jobs"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH "))
    report: dict[str, Any] = json.loads(line.removeprefix("BENCH "))
    return report


def load_wrk(pid: int, url: str, key: str | None, args: argparse.Namespace, name: str) -> Result:
    """The same load with wrk: a warm-up run, then the measured run (server CPU over it)."""
    script = Path(tempfile.mkdtemp(prefix="bench-wrk-")) / "post_jobs.lua"
    script.write_text(WRK_SCRIPT)
    run_wrk(url, key, args.connections, WARMUP_S, script)
    before = cpu_seconds(pid)
    report = run_wrk(url, key, args.connections, args.seconds, script)
    cpu = cpu_seconds(pid) - before
    statuses = {int(k): v for k, v in report["statuses"].items()}
    if report["socket_errors"]:
        statuses[0] = report["socket_errors"]
    requests = report["requests"]
    return Result(
        name, requests, requests - statuses.get(202, 0), report["duration_us"] / 1e6, [],
        statuses, server_cpu_s=cpu, cpu_requests=requests,
        percentiles={0.5: report["p50"] / 1000, 0.99: report["p99"] / 1000,
                     1.0: report["max"] / 1000},
    )  # fmt: skip


def service_env(settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHDERM_")}
    for field, value in settings.model_dump().items():
        if value is not None:
            env[f"SYNTHDERM_{field.upper()}"] = str(value)
    return env


def prepare(settings: Any) -> str:
    """Migrate, build the tiny generators and register them, and make a key: what
    `synthderm run` does before it serves, plus the key a user would make."""
    from app.cli.admin import build_tiny_models, upgrade_database
    from app.db.session import session_scope
    from app.keys import create_key
    from app.vocabulary import register_models_in

    build_tiny_models(settings.resolved_models_dir)
    upgrade_database(settings)
    with session_scope(settings.database_url) as session:
        register_models_in(session=session, models_dir=settings.resolved_models_dir)
        _row, raw = create_key(session=session, name="bench")
    return raw


def dispatch_check(settings: Any, created: int) -> str:
    """Every job stored, no chunk sent twice, and the broker holding exactly what is marked."""
    from sqlalchemy import func, select

    from app.broker import GPU_QUEUE, queue_depth
    from app.db.session import session_scope
    from app.db.tables import Job, JobChunk

    with session_scope(settings.database_url) as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        twice = session.scalar(
            select(func.count()).select_from(JobChunk).where(JobChunk.dispatches > 1)
        )
        marked = session.scalar(
            select(func.count()).select_from(JobChunk).where(JobChunk.dispatched_at.is_not(None))
        )
    depth = queue_depth(settings, GPU_QUEUE)
    ok = created > 0 and jobs >= created and twice == 0 and depth == marked
    return (
        f"jobs stored {jobs} (202s counted {created}, plus warm-up), chunks sent twice {twice}, "
        f"marked dispatched {marked}, in the broker {depth}: {'ok' if ok else 'MISMATCH'}"
    )


def measured(pid: int, url: str, key: str | None, args: argparse.Namespace, name: str) -> Result:
    """The load, with the server's CPU seconds over the whole run (warm-up included)."""
    if args.generator == "wrk":
        return load_wrk(pid, url, key, args, name)
    before = cpu_seconds(pid)
    result = asyncio.run(load(url, key, args.connections, args.seconds, name))
    result.server_cpu_s = cpu_seconds(pid) - before
    return result


def run_stack(name: str, args: argparse.Namespace, tmp: Path) -> tuple[Result, str]:
    from app.config import Settings

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{name}.log"
    if name == "bare":
        env = dict(os.environ)
        command = ["uvicorn", "bench.api_load:bare_app", "--host", "127.0.0.1", "--port",
                   str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        with server(command, env, url, log) as pid:
            return measured(pid, url, None, args, name), ""
    with contextlib.ExitStack() as stack:
        extra: dict[str, Any] = {}
        if name == "postgres+redis":
            import redis

            redis.Redis.from_url(REDIS_URL).flushdb()
            extra = {"database_url": stack.enter_context(fresh_pg_database()),
                     "broker_url": REDIS_URL}  # fmt: skip
        settings = Settings(
            data_dir=tmp / name, api_host="127.0.0.1", api_port=port, public_base_url=url,
            **extra,
        )  # fmt: skip
        key = prepare(settings)
        command = ["uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", "--no-access-log",
                   "--workers", str(args.api_workers)]  # fmt: skip
        with server(command, service_env(settings), url, log) as pid:
            result = measured(pid, url, key, args, name)
            time.sleep(1.0)  # the last responses' background dispatches
            check = dispatch_check(settings, result.statuses.get(202, 0))
        return result, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument(
        "--api-workers", type=int, default=1, help="uvicorn worker processes of the service"
    )
    parser.add_argument(
        "--stacks", default="bare,embedded,postgres+redis", help="comma-separated, bare first"
    )
    parser.add_argument(
        "--generator", choices=("httpx", "wrk"), default="httpx",
        help="the load generator: httpx (Python, about a core) or wrk (C, apt-get install wrk)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.generator == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("--generator wrk needs wrk on PATH (apt-get install wrk)")
    machine = platform.processor() or platform.machine()
    print(f"# bench.api_load on {machine}, {os.cpu_count()} CPUs; "
          f"{args.connections} connections, {args.seconds:g} s each, "
          f"{args.api_workers} API process(es), load generator {args.generator}")  # fmt: skip
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        for name in args.stacks.split(","):
            result, check = run_stack(name, args, Path(tmp))
            results[name] = result
            base = results.get("bare")
            ratio = f", {result.rate / base.rate:.2f}x bare" if base and name != "bare" else ""
            print(
                f"{name:15s} {result.requests:6d} requests, {result.failures} failures "
                f"{dict(sorted(result.statuses.items()))}: {result.rate:6.1f} req/s, "
                f"p50 {result.quantile(0.5):6.1f} ms, p99 {result.quantile(0.99):6.1f} ms, "
                f"max {result.quantile(1.0):6.1f} ms{ratio}"
            )
            # about, warm-up included (httpx); exactly the measured requests (wrk)
            total = result.cpu_requests or result.requests * (1 + WARMUP_S / args.seconds)
            print(f"{'':15s} server CPU {result.server_cpu_s:.1f} s, about "
                  f"{result.server_cpu_s / max(total, 1) * 1000:.1f} ms per request")  # fmt: skip
            if check:
                print(f"{'':15s} {check}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
