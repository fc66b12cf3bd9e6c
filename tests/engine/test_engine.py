"""The job engine alone, on each database: no API, no worker, no diffusers.

One insert for every kind (the chunk layout each kind relies on), the claim/progress/finish
state machine with its two failure policies, cancel, the dispatch window (marks only what the
broker took, holds the rest, interleaves keys), and recovery's view of a chunk nobody sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.db.session import make_engine, session_factory
from app.db.tables import ApiKey, Base, Job, JobChunk, utcnow
from app.errors import Conflict, NotFound


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Iterator[Settings]:
    db = make_engine(database_url)
    Base.metadata.create_all(db)
    db.dispose()
    yield Settings(data_dir=tmp_path, database_url=database_url, stale_after_s=30)


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    with session_factory(settings.database_url)() as session:
        session.add_all([ApiKey(id=k, name=k, prefix=k, key_hash=k) for k in ("me", "them")])
        session.commit()
        yield session


def owner(session: Session, key: str = "me") -> ApiKey:
    row = session.get(ApiKey, key)
    assert row is not None
    return row


def chunks(session: Session, job: Job) -> list[tuple[int, int, int, str]]:
    rows = session.scalars(select(JobChunk).where(JobChunk.job_id == job.id).order_by("index"))
    return [(c.index, c.start, c.stop, c.status) for c in rows]


@pytest.mark.parametrize(
    ("kind", "count", "chunk_size", "expected"),
    [
        ("generate", 20, 8, [(0, 0, 8), (1, 8, 16), (2, 16, 20)]),
        ("experiment", 3, 1, [(0, 0, 1), (1, 1, 2), (2, 2, 3)]),
        ("export", 7, 7, [(0, 0, 7)]),
        ("ingest", 0, 1, [(0, 0, 1)]),  # its count is learned later; one chunk all the same
    ],
)
def test_one_insert_for_every_kind(
    session: Session, kind: str, count: int, chunk_size: int, expected: list[tuple[int, ...]]
) -> None:
    job = engine.insert_job(
        session=session, owner=owner(session), kind=kind, count=count, chunk_size=chunk_size,
        params={"x": 1}, idempotency_key=f"key-{kind}",
    )  # fmt: skip
    session.commit()
    assert [c[:3] for c in chunks(session, job)] == expected
    assert {c[3] for c in chunks(session, job)} == {"pending"}
    assert engine.chunk_count(job) == len(expected)
    assert (job.kind, job.status, job.done, job.params) == (kind, "queued", 0, {"x": 1})
    found = engine.job_for_request(
        session=session, owner_id="me", kind=kind, key=f"key-{kind}", request_hash=None
    )
    assert found is not None and found.id == job.id
    other = "export" if kind != "export" else "generate"  # a key is scoped to (owner, kind)
    assert (
        engine.job_for_request(
            session=session, owner_id="me", kind=other, key=f"key-{kind}", request_hash=None
        )
        is None
    )


def new_job(session: Session, *, count: int = 3, kind: str = "experiment") -> Job:
    job = engine.insert_job(
        session=session, owner=owner(session), kind=kind, count=count, chunk_size=1, params={}
    )
    session.commit()
    return job


def claim(session: Session, settings: Settings, job: Job, index: int) -> engine.ChunkClaim:
    claimed = engine.claim_chunk(
        session=session, settings=settings, job_id=job.id, index=index, worker="w:1"
    )
    assert claimed is not None
    return claimed


def test_a_job_succeeds_when_its_last_chunk_does(session: Session, settings: Settings) -> None:
    job = new_job(session, count=2, kind="generate")
    first = claim(session, settings, job, 0)
    assert (first.index, first.start, first.stop, first.attempt) == (0, 0, 1, 1)
    assert engine.job_status(session=session, job_id=job.id) == "running"
    # a live claim is not taken twice
    assert (
        engine.claim_chunk(session=session, settings=settings, job_id=job.id, index=0, worker="x")
        is None
    )
    engine.record_progress(session=session, job_id=job.id, index=0, done=1)
    status = engine.finish_chunk(
        session=session, job_id=job.id, index=0, status="succeeded", done=1
    )
    assert status == "running"
    claim(session, settings, job, 1)
    status = engine.finish_chunk(
        session=session, job_id=job.id, index=1, status="succeeded", done=1
    )
    assert status == "succeeded"
    session.refresh(job)
    assert job.done == 2 and job.finished_at is not None


def test_fail_fast_fails_the_job_and_cancels_what_waits(
    session: Session, settings: Settings
) -> None:
    job = new_job(session, count=3, kind="generate")
    claim(session, settings, job, 0)
    status = engine.finish_chunk(
        session=session, job_id=job.id, index=0, status="failed", done=0, error="boom"
    )
    assert status == "failed"
    assert [c[3] for c in chunks(session, job)] == ["failed", "canceled", "canceled"]
    # a message for a chunk of a finished job is dropped
    assert (
        engine.claim_chunk(session=session, settings=settings, job_id=job.id, index=1, worker="w")
        is None
    )


def test_without_fail_fast_the_job_settles_when_drained(
    session: Session, settings: Settings
) -> None:
    job = new_job(session, count=3)
    claim(session, settings, job, 0)
    assert (
        engine.finish_chunk(
            session=session, job_id=job.id, index=0, status="failed", done=0, fail_fast=False
        )
        == "running"
    )
    for index in (1, 2):
        claim(session, settings, job, index)
        final = engine.finish_chunk(
            session=session, job_id=job.id, index=index, status="succeeded", done=1,
            fail_fast=False,
        )  # fmt: skip
    assert final == "failed"
    session.refresh(job)
    assert job.error == "1 of 3 runs failed"


def test_cancel_stops_pending_chunks_once(session: Session, settings: Settings) -> None:
    job = new_job(session, count=2, kind="generate")
    claim(session, settings, job, 0)
    engine.cancel_job(session=session, job_id=job.id, owner=owner(session))
    session.commit()
    assert [c[3] for c in chunks(session, job)] == ["running", "canceled"]
    with pytest.raises(Conflict):
        engine.cancel_job(session=session, job_id=job.id, owner=owner(session))
    with pytest.raises(NotFound):  # another key's job is a missing one
        engine.get_job(session=session, job_id=job.id, owner=owner(session, "them"))


def dispatched(session: Session, job: Job) -> list[int]:
    session.expire_all()
    return sorted(
        session.scalars(
            select(JobChunk.index).where(
                JobChunk.job_id == job.id, JobChunk.dispatched_at.is_not(None)
            )
        )
    )


def test_dispatch_marks_only_what_the_broker_took(session: Session, settings: Settings) -> None:
    job = new_job(session, count=5, kind="generate")
    sent: list[int] = []
    broker = {"up": True}

    def send(job_id: str, index: int) -> None:
        if len(sent) == 2 and not broker["up"]:
            raise ConnectionError("broker down")
        sent.append(index)

    fill = session_factory(settings.database_url)
    broker["up"] = False
    with pytest.raises(ConnectionError):
        engine.fill_window(session_factory=fill, kind="generate", window=10, send=send)
    assert dispatched(session, job) == sent == [0, 1]  # the refused one is unmarked

    # the three nobody sent are not "lost": they wait for the next refill, which sends each once
    lost = engine.find_lost_chunks(
        session=session, settings=settings, kind="generate", queue_is_empty=False
    )
    assert [c for c in lost if c.job_id == job.id] == []
    broker["up"] = True
    assert engine.fill_window(session_factory=fill, kind="generate", window=10, send=send) == 3
    assert sent == [0, 1, 2, 3, 4]
    assert dispatched(session, job) == [0, 1, 2, 3, 4]
    assert engine.fill_window(session_factory=fill, kind="generate", window=10, send=send) == 0
    assert session.scalar(select(func.max(JobChunk.dispatches))) == 1  # each sent once


def test_window_holds_the_rest_and_interleaves_keys(session: Session, settings: Settings) -> None:
    """A key's huge job fills the window; another key's small job takes the next free place,
    ahead of the huge job's remaining chunks; a cancel leaves at most the window behind."""
    huge = engine.insert_job(
        session=session, owner=owner(session), kind="generate", count=100, chunk_size=1, params={}
    )
    session.commit()
    sent: list[tuple[str, int]] = []
    fill = session_factory(settings.database_url)

    def refill() -> int:
        return engine.fill_window(
            session_factory=fill, kind="generate", window=2, send=lambda j, i: sent.append((j, i))
        )

    assert refill() == 2
    assert sent == [(huge.id, 0), (huge.id, 1)]
    assert engine.waiting_count(session=session, kind="generate") == 2
    small = engine.insert_job(
        session=session, owner=owner(session, "them"), kind="generate", count=2, chunk_size=1,
        params={},
    )  # fmt: skip
    session.commit()
    assert refill() == 0  # the window is full: the small job waits in the database

    claim(session, settings, huge, 0)  # a worker took a message: one place is free
    assert refill() == 1
    assert sent[-1] == (small.id, 0)  # "them" has nothing in flight, "me" has two
    claim(session, settings, huge, 1)
    assert refill() == 1
    # in flight: "me" two running, "them" one waiting: "them" still has fewer
    assert sent[-1] == (small.id, 1)
    engine.finish_chunk(session=session, job_id=huge.id, index=0, status="succeeded", done=1)
    claim(session, settings, small, 0)
    assert refill() == 1
    assert sent[-1] == (huge.id, 2)  # the small job has all its chunks out: the huge one goes on

    engine.cancel_job(session=session, job_id=huge.id, owner=owner(session))
    session.commit()
    assert refill() == 0  # the small job has nothing left to send
    # in the broker at most the window: the huge job's last chunk and the small job's second
    assert sent[-2:] == [(small.id, 1), (huge.id, 2)]
    assert len(sent) == 5
    remaining = session.scalar(
        select(func.count())
        .select_from(JobChunk)
        .where(JobChunk.job_id == huge.id, JobChunk.dispatched_at.is_(None))
    )
    assert remaining == 97  # never sent: no message to drain after the cancel
    assert engine.has_active_chunks(session=session, kind="generate")
    assert not engine.has_active_chunks(session=session, kind="export")


def test_recovery_closes_a_dead_workers_chunk_of_an_ended_job(
    session: Session, settings: Settings
) -> None:
    """A worker died in the middle of a chunk, then the job was canceled: the chunk would stay
    `running` forever (recovery only re-sends chunks of active jobs); it is closed instead."""
    job = new_job(session, count=2, kind="generate")
    claim(session, settings, job, 0)
    engine.cancel_job(session=session, job_id=job.id, owner=owner(session))
    session.commit()
    assert engine.close_abandoned_chunks(session=session, settings=settings, kind="generate") == 0
    session.commit()  # its heartbeat is fresh: the worker may still be stopping
    old = utcnow() - timedelta(seconds=settings.stale_after_s + 1)
    session.execute(update(JobChunk).where(JobChunk.job_id == job.id).values(heartbeat_at=old))
    session.commit()
    assert engine.close_abandoned_chunks(session=session, settings=settings, kind="generate") == 1
    session.commit()
    assert [c[3] for c in chunks(session, job)] == ["canceled", "canceled"]
