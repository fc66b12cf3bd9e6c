"""Row -> schema mappers: the public view of jobs, datasets, experiments and runs.

Routers import these; no router imports another router.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.datasets import exports as export_service
from app.db.tables import Dataset, Job, JobChunk, Run, WebhookDelivery
from app.experiments import plots
from app.experiments import runs as run_service
from app.experiments.reports import build_report
from app.schemas import (
    ChunkStep,
    CountRow,
    DatasetOut,
    DatasetStatus,
    DeliveryList,
    DeliveryOut,
    ExperimentOut,
    JobOut,
    JobStatus,
    Progress,
    RunOut,
    RunProgress,
    SplitCountRow,
    Strategy,
)

# A worker beats every heartbeat_interval_s; a running chunk that missed this many beats is
# shown as stalled (its worker likely died) until recovery re-queues it at stale_after_s.
STALLED_AFTER_BEATS = 3


def chunk_step(chunk: JobChunk, *, now: datetime, stalled_before: datetime | None) -> ChunkStep:
    """A running chunk's progress, and whether its heartbeat stopped (last beat before
    `stalled_before`, from `stalled_since`)."""
    beat = chunk.heartbeat_at
    return ChunkStep(
        chunk=chunk.index,
        done=chunk.done,
        step=chunk.step,
        steps=chunk.steps,
        heartbeat_age_s=None if beat is None else round(max((now - beat).total_seconds(), 0.0), 1),
        stalled=beat is not None and stalled_before is not None and beat < stalled_before,
    )


def stalled_since(settings: Settings) -> datetime:
    """A running chunk whose last heartbeat is older than this is stalled."""
    return datetime.now(UTC) - timedelta(
        seconds=STALLED_AFTER_BEATS * settings.heartbeat_interval_s
    )


def job_status(job: Job, *, still_running: bool) -> JobStatus:
    """A job's status as shown: `canceling` while a canceled job's chunks finish their batch."""
    status = JobStatus(job.status)
    if status is JobStatus.CANCELED and still_running:
        return JobStatus.CANCELING
    return status


def job_out(
    job: Job,
    running: list[JobChunk] | None = None,
    *,
    stalled_before: datetime | None = None,
    still_running: bool = False,
) -> JobOut:
    """The public view of a job row (with its running chunks' steps when given, each stalled
    if its last beat is before `stalled_before`; a canceled job with a running chunk that is
    not stalled, given or `still_running`, shows as canceling)."""
    now = datetime.now(UTC)
    steps = [chunk_step(c, now=now, stalled_before=stalled_before) for c in running or []]
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job_status(
            job, still_running=still_running or any(not step.stalled for step in steps)
        ),
        dataset_id=job.dataset_id,
        condition=job.condition,
        skin_tone=job.skin_tone,
        strategy=Strategy(job.strategy) if job.strategy else None,
        model=job.model_id,
        count=job.count,
        seed=job.seed,
        chunk_size=job.chunk_size,
        chunks=engine.chunk_count(job),
        params=job.params or {},
        progress=Progress(
            done=job.done,
            total=job.count,
            running=steps,
        ),
        timings=engine.job_timings(job),
        error=job.error,
        result=job.result,
        idempotency_key=job.idempotency_key,
        webhook=job.webhook_url,
        webhook_events=job.webhook_events,
    )


def export_out(job: Job, url: Callable[[str], str]) -> JobOut:
    """An export job, with its download URLs signed again (they expire)."""
    out = job_out(job)
    out.result = export_service.with_fresh_urls(result=job.result, url=url)
    return out


def dataset_out(
    dataset: Dataset,
    image_count: int,
    counts: list[CountRow] | None = None,
    splits: list[SplitCountRow] | None = None,
    status: DatasetStatus = DatasetStatus.READY,
) -> DatasetOut:
    """The public view of a dataset row (with its counts when given)."""
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        kind=dataset.kind,
        description=dataset.description,
        created_at=dataset.created_at,
        image_count=image_count,
        status=status,
        counts=counts,
        splits=splits,
    )


def run_out(run: Run) -> RunOut:
    # the per-image correctness strings are for the report, not for reading
    metrics = {
        k: v
        for k, v in (run.metrics or {}).items()
        if k not in ("test_correct_top1", "test_correct_top3", "test_image_ids", "test_groups")
    }
    return RunOut(
        id=run.id,
        experiment_id=run.job_id,
        index=run.index,
        status=JobStatus(run.status),
        config=run.config,
        split=run.split,
        progress=RunProgress(epoch=run.epoch, max_epochs=int(run.config.get("max_epochs", 0))),
        history=run.history or [],
        best_epoch=run.best_epoch,
        metrics=metrics or None,
        reused_from=run.reused_from,
        timings=run.timings,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


def experiment_out(
    job: Job,
    runs: list[Run] | None = None,
    detail: bool = False,
    dataset_names: dict[str, str] | None = None,
) -> ExperimentOut:
    base = job_out(job)
    report = None
    if runs is not None:
        report = build_report(
            runs=runs, classes=list(job.params.get("classes", [])), dataset_names=dataset_names
        )
        if job.params.get("generator_leakage"):  # allowed, and said (app.experiments.leakage)
            report["generator_leakage"] = job.params["generator_leakage"]
    return ExperimentOut(
        id=job.id,
        name=str(job.params.get("name", "")),
        status=base.status,
        params=job.params,
        progress=base.progress,
        timings=base.timings,
        error=job.error,
        report=report,
        plots=[f"/experiments/{job.id}/plots/{name}.png" for name in plots.plot_names(job.params)],
        runs=[run_out(r) for r in runs] if detail and runs is not None else None,
        webhook=job.webhook_url,
        webhook_events=job.webhook_events,
    )


def experiment_with_report(session: Session, job: Job, detail: bool = False) -> ExperimentOut:
    """An experiment with its report (and with detail, every run)."""
    return experiment_out(
        job,
        run_service.runs_of(session=session, experiment_id=job.id),
        detail=detail,
        dataset_names=run_service.synthetic_dataset_names(session=session, job=job),
    )


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    """One entry of a job's webhook delivery log."""
    return DeliveryOut(
        id=row.id,
        job_id=row.job_id,
        event=row.event,
        url=row.url,
        status=row.status,
        attempts=row.attempts,
        response_code=row.response_code,
        error=row.error,
        payload=json.loads(row.payload),
        created_at=row.created_at,
        last_attempt_at=row.last_attempt_at,
        next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
        delivered_at=row.delivered_at,
    )


def delivery_page(*, session: Session, job: Job, limit: int, cursor: str | None) -> DeliveryList:
    """One page of a job's webhook delivery log, newest first (/jobs and /experiments)."""
    rows, next_cursor = engine.list_deliveries(session=session, job=job, limit=limit, cursor=cursor)
    return DeliveryList(items=[delivery_out(r) for r in rows], next_cursor=next_cursor)
