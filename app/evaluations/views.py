"""Row -> schema: the public view of an evaluation, and its memorisation table as CSV or JSON
lines (streamed a page at a time)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import engine
from app.datasets.copies import PAIR_COLUMNS, iter_pairs
from app.db.session import session_factory
from app.db.tables import Job, JobChunk
from app.evaluations import STAGES
from app.schemas import JobStatus
from app.schemas.evaluations import EvaluationOut, EvaluationProgress, PairsFormat


def evaluation_out(session: Session, job: Job) -> EvaluationOut:
    params = job.params
    chunk = session.scalar(select(JobChunk).where(JobChunk.job_id == job.id, JobChunk.index == 0))
    status = JobStatus(job.status)
    step = (chunk.step if chunk is not None else None) or 0
    if status is JobStatus.SUCCEEDED:
        step = len(STAGES)
    running = status is JobStatus.RUNNING and chunk is not None and chunk.status == "running"
    result = job.result if status is JobStatus.SUCCEEDED else None
    return EvaluationOut(
        id=job.id,
        status=status,
        synthetic_dataset=params["synthetic_dataset"],
        real_dataset=params["real_dataset"],
        real_split=params.get("real_split"),
        test_split=params["test_split"],
        conditions=params["conditions"],
        seed=job.seed,
        backbone=params["backbone"],
        progress=EvaluationProgress(
            step=step,
            steps=len(STAGES),
            stage=STAGES[min(step, len(STAGES) - 1)] if running else None,
        ),
        timings=engine.job_timings(job),
        result=result,
        plots=list((result or {}).get("figures", [])),
        error=job.error,
        idempotency_key=job.idempotency_key,
        webhook=job.webhook_url,
        webhook_events=job.webhook_events,
    )


def pair_lines(*, database_url: str, job_id: str, fmt: PairsFormat) -> Iterator[bytes]:
    """The audit table, most similar first, as CSV (with a header) or JSON lines. Reads on a
    session of its own: the response streams after the request's session is closed."""
    with session_factory(database_url)() as session:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if fmt is PairsFormat.CSV:
            writer.writerow(PAIR_COLUMNS)
        for n, row in enumerate(iter_pairs(session=session, job_id=job_id), start=1):
            if fmt is PairsFormat.CSV:
                writer.writerow(["" if v is None else v for v in row.values()])
            else:
                buffer.write(json.dumps(row) + "\n")
            if n % 1000 == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()
