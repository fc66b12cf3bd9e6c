"""/healthz (the process answers), /readyz (database, broker, store) and /metrics."""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import text

from app.api.deps import SettingsDep, StoreDep
from app.api.problems import problem_responses
from app.broker import GPU_QUEUE, TRAIN_QUEUE, check_broker, queue_depth
from app.config import Settings
from app.datasets import repository as datasets
from app.db.session import session_factory
from app.engine import metrics as job_metrics
from app.errors import Forbidden, Unauthorized
from app.schemas import CheckResult, Readiness

router = APIRouter(tags=["health"])

DURATION_BUCKETS = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the API process answers."""
    return {"status": "ok"}


def _timed(check: object) -> CheckResult:
    started = time.perf_counter()
    try:
        check()  # type: ignore[operator]
    except Exception as exc:
        return CheckResult(ok=False, detail=f"{type(exc).__name__}: {exc}"[:500])
    return CheckResult(ok=True, detail=f"ok in {1000 * (time.perf_counter() - started):.0f} ms")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency does not answer."}},
)
def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """Readiness: each dependency reported; 503 unless all answer."""

    def database() -> None:
        with session_factory(settings.database_url)() as session:
            session.execute(text("SELECT 1"))
            session.execute(text("SELECT version_num FROM alembic_version"))

    checks = {
        "database": _timed(database),
        "broker": _timed(lambda: check_broker(settings)),
        "store": _timed(store.check),
    }
    ok = all(c.ok for c in checks.values())
    body = Readiness(ok=ok, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


class ServiceCollector(Collector):
    """Metrics read from the database (the source of truth shared by every process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        with session_factory(self.settings.database_url)() as session:
            by_status = job_metrics.jobs_by_kind_and_status(session=session)
            images = datasets.count_images(session=session, source="synthetic")
            durations = job_metrics.chunk_durations(session=session, buckets=DURATION_BUCKETS)
        family = GaugeMetricFamily(
            "synthderm_jobs", "Jobs by kind and status.", labels=["kind", "status"]
        )
        for (kind, status), count in sorted(by_status.items()):
            family.add_metric([kind, status], count)
        yield family
        yield CounterMetricFamily(
            "synthderm_images_generated", "Synthetic images written.", value=images
        )
        histogram = HistogramMetricFamily(
            "synthderm_task_duration_seconds",
            "Duration of succeeded chunk tasks by job kind (a training run is one chunk).",
            labels=["kind"],
        )
        for kind, (counts, total, n) in sorted(durations.items()):
            buckets = [(str(b), c) for b, c in zip(DURATION_BUCKETS, counts, strict=True)]
            buckets.append(("+Inf", n))
            histogram.add_metric([kind], buckets, sum_value=total)
        yield histogram
        gauge = GaugeMetricFamily("synthderm_queue_depth", "Messages waiting.", labels=["queue"])
        try:
            for queue in (GPU_QUEUE, TRAIN_QUEUE):
                gauge.add_metric([queue], queue_depth(self.settings, queue))
        except Exception:
            return  # the broker is down: /readyz says so
        yield gauge


# Headers a proxy adds: a request that came through one is not a local one, whatever address
# the proxy connected from
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and ::ffff:127.x; False for anything else (a name, a Unix
    socket's missing address)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def check_metrics_access(
    *, token: str, authorization: str, client_host: str | None, proxied: bool
) -> None:
    """/metrics is for operators (issue 21), not every API key: with a token set, only
    `Authorization: Bearer <token>` (401 otherwise); without one, only a client on loopback
    that did not come through a proxy (403 otherwise)."""
    if token:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("/metrics needs the metrics token: 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("the metrics token is not valid (an API key is not one)")
        return
    if not is_loopback(client_host) or proxied:
        raise Forbidden(
            "/metrics answers only clients on this host's loopback unless "
            "SYNTHDERM_METRICS_TOKEN is set (then with that token as a bearer token)"
        )


def metrics_access(request: Request, settings: SettingsDep) -> None:
    check_metrics_access(
        token=settings.metrics_token,
        authorization=request.headers.get("authorization", ""),
        client_host=request.client.host if request.client else None,
        proxied=any(name in request.headers for name in PROXY_HEADERS),
    )


_METRICS = {
    200: {
        "description": "Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    **problem_responses(401, 403),
}


@router.get(
    "/metrics",
    dependencies=[Depends(metrics_access)],
    response_class=Response,
    responses=_METRICS,
)
def metrics(settings: SettingsDep) -> Response:
    """Prometheus text format, for operators: with SYNTHDERM_METRICS_TOKEN set, scrape with it
    as a bearer token; without it, from this host's loopback only."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(settings))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
