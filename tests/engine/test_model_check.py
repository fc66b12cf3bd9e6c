"""POST /jobs' model check in the service alone, on each database: a base model is read once
per `BASE_MODEL_MEMO_S` per process (the jobs path's largest query under load, issue 21), a
key's own models on every job, and the strategy check refuses either way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.session import make_engine, session_factory
from app.db.tables import ApiKey, Base, Condition, GeneratorModel
from app.errors import InvalidField
from app.generation import service
from app.schemas import JobCreate

T2I = "StableDiffusionPipeline"
INPAINT = "StableDiffusionInpaintPipeline"


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Iterator[Settings]:
    db = make_engine(database_url)
    Base.metadata.create_all(db)
    db.dispose()
    yield Settings(
        data_dir=tmp_path, database_url=database_url,
        default_model="base-t2i", default_inpaint_model="base-inpaint",
    )  # fmt: skip


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    service._base_models.clear()
    with session_factory(settings.database_url)() as session:
        session.add_all([ApiKey(id=k, name=k, prefix=k, key_hash=k) for k in ("me", "them")])
        session.add(Condition(slug="psoriasis", name="psoriasis"))
        session.add_all(
            [
                GeneratorModel(id="base-t2i", path="/m/a", pipeline_class=T2I),
                GeneratorModel(id="base-inpaint", path="/m/b", pipeline_class=INPAINT),
                GeneratorModel(id="mine", path="/m/c", pipeline_class=T2I, owner_id="me"),
            ]
        )
        session.commit()
        yield session
    service._base_models.clear()


@pytest.fixture
def model_reads(session: Session) -> Iterator[list[str]]:
    """The statements that read generator_models, as the session's engine runs them."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM generator_models" in statement:
            seen.append(statement)

    bind = session.get_bind()
    event.listen(bind, "before_cursor_execute", record)
    yield seen
    event.remove(bind, "before_cursor_execute", record)


def job(session: Session, settings: Settings, key: str = "me", **body: Any) -> str:
    params = JobCreate.model_validate({"condition": "psoriasis", "count": 1, **body})
    owner = session.get(ApiKey, key)
    assert owner is not None
    made, created = service.create_job(session=session, settings=settings, params=params,
                                       owner=owner)  # fmt: skip
    session.commit()
    assert created
    return str(made.model_id)


def test_a_base_model_is_read_once_and_a_keys_own_every_time(
    session: Session, settings: Settings, model_reads: list[str]
) -> None:
    assert job(session, settings) == "base-t2i"  # the default
    assert len(model_reads) == 1
    assert job(session, settings, key="them") == "base-t2i"  # another key: the same answer
    assert job(session, settings, model="base-t2i", skin_tone=3) == "base-t2i"
    assert len(model_reads) == 1
    assert job(session, settings, model="mine") == "mine"
    assert job(session, settings, model="mine") == "mine"
    assert len(model_reads) == 3  # a key's own model is read on every job
    with pytest.raises(InvalidField, match="unknown model 'mine'") as refused:
        job(session, settings, key="them", model="mine")  # another key's is unknown
    assert refused.value.field == "model"


def test_the_strategy_check_refuses_a_remembered_model_too(
    session: Session, settings: Settings, model_reads: list[str]
) -> None:
    for attempt in range(2):
        with pytest.raises(InvalidField, match="needs an inpainting pipeline; base-t2i is a"):
            job(session, settings, model="base-t2i", strategy="inpaint")
        with pytest.raises(InvalidField, match="needs a text-to-image pipeline; base-inpaint"):
            job(session, settings, model="base-inpaint")
        assert len(model_reads) == 2, attempt  # the second round answered from the memo
    session.rollback()


def test_the_memo_forgets_after_its_time(
    session: Session, settings: Settings, model_reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert job(session, settings) == "base-t2i"
    now = service.time.monotonic()
    monkeypatch.setattr(service.time, "monotonic", lambda: now + service.BASE_MODEL_MEMO_S + 1)
    assert job(session, settings) == "base-t2i"
    assert len(model_reads) == 2
