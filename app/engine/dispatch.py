"""Dispatch: keep a bounded window of each job kind's chunks in the broker, fairly across keys.

The database holds every chunk; the broker holds at most `dispatch_window` of a kind's chunks
that no worker has taken yet. The window is refilled when a job is committed, when a worker
claims a chunk (a message left the queue), when it finishes one, and by the recovery step.
Each refill sends the next chunk of the key with the fewest chunks in flight (waiting or
running), its oldest job first, so one key's million-image job cannot hold a queue: another
key's small job starts within a chunk or two, and a cancel leaves at most the window behind.

A chunk is marked dispatched in the transaction that picks it, then sent; a broker failure
unmarks it and leaves it to the next refill or to the recovery step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import anyio.to_thread
from sqlalchemy import ColumnElement, and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.broker import send_chunk
from app.config import Settings
from app.db.session import session_factory as make_session_factory
from app.db.tables import Job, JobChunk, utcnow
from app.engine.jobs import ACTIVE_STATUS_VALUES, ChunkStatus

log = logging.getLogger(__name__)

PENDING = ChunkStatus.PENDING.value
RUNNING = ChunkStatus.RUNNING.value

# The predicates of the partial indexes ix_job_chunks_undispatched and ix_job_chunks_in_flight
# (app/db/tables.py), written the same way so that both databases use them.
UNDISPATCHED: ColumnElement[bool] = and_(
    JobChunk.status == PENDING, JobChunk.dispatched_at.is_(None)
)
WAITING: ColumnElement[bool] = and_(JobChunk.status == PENDING, JobChunk.dispatched_at.is_not(None))
IN_FLIGHT: ColumnElement[bool] = or_(JobChunk.status == RUNNING, WAITING)


class Background(Protocol):
    """Where a request leaves work for after its response (Starlette's BackgroundTasks)."""

    def add_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...


def _active(kind: str) -> Any:
    return select(Job.id).where(Job.kind == kind, Job.status.in_(ACTIVE_STATUS_VALUES))


def waiting_count(*, session: Session, kind: str) -> int:
    """Chunks of active `kind` jobs sent to the broker and not yet claimed. A join, not
    `job_id IN (active jobs)`: SQLite built that list of every queued job first (9 ms with 5,000
    queued jobs, against 1.2 ms; the API asks this after its requests)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(JobChunk)
            .join(Job, Job.id == JobChunk.job_id)
            .where(IN_FLIGHT, WAITING, Job.kind == kind, Job.status.in_(ACTIVE_STATUS_VALUES))
        )
        or 0
    )


def next_chunk(*, session: Session, kind: str) -> tuple[str, int] | None:
    """The chunk to send next: of the key with the fewest chunks in flight (ties: the key whose
    oldest waiting job is oldest), its oldest job's lowest undispatched chunk."""
    active = _active(kind)
    flight = dict(
        session.execute(
            select(Job.owner_id, func.count())
            .join(JobChunk, JobChunk.job_id == Job.id)
            .where(Job.id.in_(active), IN_FLIGHT)
            .group_by(Job.owner_id)
        ).all()
    )
    has_undispatched = (
        select(JobChunk.index).where(JobChunk.job_id == Job.id, UNDISPATCHED).exists()
    )
    waiting = session.execute(
        select(Job.owner_id, func.min(Job.created_at))
        .where(Job.id.in_(active), has_undispatched)
        .group_by(Job.owner_id)
    ).all()
    if not waiting:
        return None
    owner = min(waiting, key=lambda row: (flight.get(row[0], 0), row[1]))[0]
    job_id = session.scalar(
        select(Job.id)
        .where(Job.id.in_(active), Job.owner_id == owner, has_undispatched)
        .order_by(Job.created_at, Job.id)
        .limit(1)
    )
    index = session.scalar(
        select(func.min(JobChunk.index)).where(JobChunk.job_id == job_id, UNDISPATCHED)
    )
    return None if job_id is None or index is None else (job_id, index)


# On SQLite, one refill at a time within a process (the API's threads); see _lock_window.
_sqlite_refill = threading.Lock()


def _lock_window(session: Session, kind: str) -> None:
    """One refill of `kind` at a time on PostgreSQL (a transaction-scoped advisory lock), so
    concurrent refills do not overfill the window. On SQLite, fill_window holds a process lock
    instead; refills of two processes (the API and a worker) can still overshoot by a chunk."""
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(f"synthderm-dispatch:{kind}".encode()) & 0x7FFFFFFF
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def fill_window(
    *,
    session_factory: Callable[[], Session],
    kind: str,
    window: int,
    send: Callable[[str, int], None],
) -> int:
    """Send chunks of `kind` until `window` of them wait in the broker or none is left;
    returns how many were sent. Commits each pick before its message goes out (a fast worker
    must find the row marked), and unmarks a chunk whose message the broker refused."""
    with session_factory() as session:
        if waiting_count(session=session, kind=kind) >= window:
            return 0  # full: no lock taken (under load, most refills end here)
        sqlite = session.get_bind().dialect.name == "sqlite"
    with _sqlite_refill if sqlite else contextlib.nullcontext():
        return _fill(session_factory=session_factory, kind=kind, window=window, send=send)


def _fill(
    *,
    session_factory: Callable[[], Session],
    kind: str,
    window: int,
    send: Callable[[str, int], None],
) -> int:
    """fill_window's loop: one pick, mark and send per transaction, under the window's lock."""
    sent = 0
    while True:
        with session_factory() as session, session.begin():
            _lock_window(session, kind)
            if waiting_count(session=session, kind=kind) >= window:
                return sent
            picked = next_chunk(session=session, kind=kind)
            if picked is None:
                return sent
            job_id, index = picked
            marked = session.execute(
                update(JobChunk)
                .where(JobChunk.job_id == job_id, JobChunk.index == index, UNDISPATCHED)
                .values(dispatched_at=utcnow(), dispatches=JobChunk.dispatches + 1)
            )
            if not marked.rowcount:  # type: ignore[attr-defined]
                continue  # another refill took it first
        try:
            send(job_id, index)
        except Exception:
            with session_factory() as session, session.begin():
                session.execute(
                    update(JobChunk)
                    .where(JobChunk.job_id == job_id, JobChunk.index == index, WAITING)
                    .values(dispatched_at=None, dispatches=JobChunk.dispatches - 1)
                )
            raise
        sent += 1


def refill(settings: Settings, kind: str) -> int:
    """Fill `kind`'s window from the settings' database into their broker."""
    return fill_window(
        session_factory=make_session_factory(settings.database_url),
        kind=kind,
        window=settings.dispatch_window,
        send=lambda job_id, index: send_chunk(
            settings, kind=kind, job_id=job_id, chunk_index=index
        ),
    )


# (database, kind) -> until when this process takes the window as full (time.monotonic())
_full_until: dict[tuple[str, str], float] = {}
FULL_MEMO_S = 0.25


def _taken_as_full(settings: Settings, kind: str) -> bool:
    return time.monotonic() < _full_until.get((settings.database_url, kind), 0.0)


def dispatch_after_commit(settings: Settings, job_id: str, kind: str) -> None:
    """A job was committed: fill its kind's window (its chunks go when it is their turn). On a
    broker failure the recovery step fills it later.

    A refill that found the window full is not repeated by this process for FULL_MEMO_S: under
    load that saves every request a connection and a query, and the workers refill the window
    on each claim and finish (and the recovery step every recovery_interval_s) anyway."""
    if _taken_as_full(settings, kind):
        return
    try:
        if refill(settings, kind) == 0:
            _full_until[(settings.database_url, kind)] = time.monotonic() + FULL_MEMO_S
    except Exception:
        log.exception(
            "dispatch after job %s failed; the worker's recovery step will send it", job_id
        )


async def _dispatch_after_response(settings: Settings, job_id: str, kind: str) -> None:
    """dispatch_after_commit in a worker thread, unless the window is taken as full: then
    nothing leaves the event loop (a thread hop costs more than the check)."""
    if not _taken_as_full(settings, kind):
        await anyio.to_thread.run_sync(dispatch_after_commit, settings, job_id, kind)


def enqueue_after_commit(background: Background, settings: Settings, job: Job) -> None:
    """Dispatch `job` once the response is sent, i.e. after the request's commit: a fast worker
    must find the rows its message names."""
    background.add_task(partial(_dispatch_after_response, settings, job.id, job.kind))
