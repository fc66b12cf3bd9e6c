"""What every task shares: the chunk claim, the heartbeat, the object store, and cancellation.

Tasks import their plumbing from here, never from a sibling task, so that a change to one task
cannot break another by import. Each task keeps its own error policy (generate retries, train
goes on with the other runs, ingest and export discard what they wrote).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Task
from celery.signals import task_postrun
from sqlalchemy.orm import Session

from app import engine
from app.broker import JOB_TASKS
from app.config import Settings, get_settings
from app.db.session import session_factory
from app.schemas import JobStatus
from app.storage import ObjectStore, make_store

log = logging.getLogger(__name__)

_state_lock = threading.Lock()
_store: ObjectStore | None = None
# task name -> the job kind it runs
KIND_OF_TASK = {task: kind for kind, (task, _queue) in JOB_TASKS.items()}


class Canceled(Exception):
    """The chunk's job stopped (canceled, or failed by another chunk) while the chunk ran."""


def object_store(settings: Settings) -> ObjectStore:
    """The worker's one object store client."""
    global _store
    with _state_lock:
        if _store is None:
            _store = make_store(settings)
        return _store


def worker_name(task: Task) -> str:
    """host:pid, the name a claim records."""
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


def claim_task_chunk(
    task: Task, job_id: str, chunk_index: int
) -> tuple[Settings, str, engine.ChunkClaim | None]:
    """Every task's prologue: the settings, this worker's name, and the chunk claimed for it
    (None: the job is over, the chunk is done or another live worker holds it)."""
    settings = get_settings()
    worker = worker_name(task)
    with session_factory(settings.database_url)() as session:
        claim = engine.claim_chunk(
            session=session, settings=settings, job_id=job_id, index=chunk_index, worker=worker
        )
    refill_window(settings, task.name)  # this message left the queue: the next one goes in
    return settings, worker, claim


def refill_window(settings: Settings, task_name: str | None) -> None:
    """Top up the dispatch window of the task's job kind (app/engine/dispatch.py); a broker
    failure is logged and left to the recovery step."""
    kind = KIND_OF_TASK.get(task_name or "")
    if kind is None:
        return
    try:
        engine.refill(settings, kind)
    except Exception:
        log.exception("refilling the %s dispatch window failed; recovery will", kind)


@task_postrun.connect
def _refill_after_task(sender: Task | None = None, **_kwargs: object) -> None:
    """A chunk task ended (done, failed, skipped or retrying): its worker is free for the next."""
    if sender is not None:
        refill_window(get_settings(), sender.name)


@contextmanager
def heartbeat(settings: Settings, *, job_id: str, index: int, worker: str) -> Iterator[None]:
    """Touch the chunk's heartbeat every `heartbeat_interval_s` while the body runs."""
    stop = threading.Event()
    make_session = session_factory(settings.database_url)

    def beat() -> None:
        while not stop.wait(settings.heartbeat_interval_s):
            try:
                with make_session() as session:
                    engine.record_heartbeat(
                        session=session, job_id=job_id, index=index, worker=worker
                    )
            except Exception:
                log.exception("heartbeat of chunk %s/%s failed", job_id, index)

    thread = threading.Thread(target=beat, name="synthderm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


# The two stop policies. Generation, ingest and export stop as soon as their job is no longer
# running (canceled, or failed by another chunk). An experiment's run stops only on cancel: a
# failed sibling run must not stop the others.


def job_stopped(*, session: Session, job_id: str) -> bool:
    """The job is no longer running (canceled, failed, or gone)."""
    return engine.job_status(session=session, job_id=job_id) != JobStatus.RUNNING


def job_canceled(*, session: Session, job_id: str) -> bool:
    """The job was canceled."""
    return engine.job_status(session=session, job_id=job_id) == JobStatus.CANCELED
