"""Dispatch: send a committed job's chunks to the broker, marking each only once it is accepted.

Commit first, enqueue after: a fast worker must find the rows its message names. A broker
failure leaves the unmarked chunks to the recovery step instead of losing them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.broker import send_chunk
from app.config import Settings
from app.db.session import session_factory as make_session_factory
from app.db.tables import Job, JobChunk, utcnow
from app.engine.claims import job_status
from app.engine.jobs import ACTIVE_STATUS_VALUES, ChunkStatus

log = logging.getLogger(__name__)


class Background(Protocol):
    """Where a request leaves work for after its response (Starlette's BackgroundTasks)."""

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...


def undispatched_chunks(*, session: Session, job_id: str) -> list[int]:
    """Indices of the job's pending chunks that no message was sent for."""
    return list(
        session.scalars(
            select(JobChunk.index).where(
                JobChunk.job_id == job_id,
                JobChunk.status == ChunkStatus.PENDING.value,
                JobChunk.dispatched_at.is_(None),
            )
        )
    )


def dispatch_job(
    *,
    session_factory: Callable[[], Session],
    job_id: str,
    send: Callable[[str, int], None],
    mark_every: int = 200,
) -> int:
    """Send every undispatched chunk of a committed job; returns how many were sent. Commits
    the marks.

    Chunks are marked only after their messages are accepted, so a broker failure leaves the
    rest for the recovery step instead of losing them."""
    with session_factory() as session:
        indices = undispatched_chunks(session=session, job_id=job_id)
    sent: list[int] = []

    def mark() -> None:
        if not sent:
            return
        with session_factory() as session, session.begin():
            session.execute(
                update(JobChunk)
                .where(
                    JobChunk.job_id == job_id,
                    JobChunk.index.in_(sent),
                    JobChunk.dispatched_at.is_(None),
                )
                .values(dispatched_at=utcnow(), dispatches=JobChunk.dispatches + 1)
            )
        sent.clear()

    total = 0
    try:
        for index in indices:
            send(job_id, index)
            sent.append(index)
            total += 1
            if len(sent) >= mark_every:
                mark()
                with session_factory() as session:
                    if job_status(session=session, job_id=job_id) not in ACTIVE_STATUS_VALUES:
                        break  # canceled or failed while its chunks were being sent
    finally:
        mark()
    return total


def dispatch_after_commit(settings: Settings, job_id: str, kind: str) -> None:
    """Send a committed job's chunks; on a broker failure the recovery step sends them."""
    try:
        dispatch_job(
            session_factory=make_session_factory(settings.database_url),
            job_id=job_id,
            send=lambda j, i: send_chunk(settings, kind=kind, job_id=j, chunk_index=i),
        )
    except Exception:
        log.exception("dispatch of job %s failed; the worker's recovery step will send it", job_id)


def enqueue_after_commit(background: Background, settings: Settings, job: Job) -> None:
    """Dispatch `job` once the response is sent, i.e. after the request's commit: a fast worker
    must find the rows its message names."""
    background.add_task(partial(dispatch_after_commit, settings, job.id, job.kind))
