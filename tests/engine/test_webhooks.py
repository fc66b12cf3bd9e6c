"""Webhooks in the engine, on each database: the signature against a hand-computed HMAC, where
a webhook may point, which events a job's life writes (each once, progress throttled, the end
always) and that their tasks are sent only after a commit; the backoff; the migration that
gives existing keys a secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from app import engine
from app.broker import WEBHOOK_QUEUE, queue_depth
from app.config import Settings
from app.db.session import make_engine, session_factory
from app.db.tables import ApiKey, Base, Job, WebhookDelivery
from app.engine import webhooks
from app.engine.deliveries import Attempt, Outcome, backoff_s, claim_attempt, post, record_outcome
from app.errors import InvalidField
from app.schemas import JobCreate
from tests.conftest import ROOT


def test_signature_is_hmac_sha256_of_id_timestamp_body() -> None:
    key = bytes(range(24))
    secret = "whsec_" + base64.b64encode(key).decode()
    body = b'{"type":"job.completed","data":{"id":"j"}}'
    by_hand = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(by_hand).decode()
    assert engine.sign(secret, msg_id="msg_1", timestamp=1700000000, body=body) == expected
    # another secret, id, timestamp or body: another signature
    other = "whsec_" + base64.b64encode(bytes(24)).decode()
    assert engine.sign(other, msg_id="msg_1", timestamp=1700000000, body=body) != expected
    assert engine.sign(secret, msg_id="msg_2", timestamp=1700000000, body=body) != expected
    assert engine.sign(secret, msg_id="msg_1", timestamp=1700000001, body=body) != expected
    assert engine.sign(secret, msg_id="msg_1", timestamp=1700000000, body=body + b" ") != expected


def test_signature_matches_the_standard_webhooks_example() -> None:
    # the example of the specification's reference libraries (standard-webhooks, svix)
    signature = engine.sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


DEPLOYED = Settings(database_url="postgresql+psycopg://x@127.0.0.1/x", broker_url="redis://x")


@pytest.mark.parametrize(
    ("url", "settings", "refused"),
    [
        ("http://127.0.0.1:9/h", DEPLOYED, "loopback"),
        ("http://[::1]:9/h", DEPLOYED, "loopback"),
        ("http://localhost:9/h", DEPLOYED, "loopback"),
        ("http://[::ffff:127.0.0.1]:9/h", DEPLOYED, "loopback"),
        ("http://127.0.0.1:9/h", Settings(), None),  # the embedded default (SQLite)
        ("http://127.0.0.1:9/h", Settings(webhook_allow_loopback=False), "loopback"),
        ("http://127.0.0.1:9/h", DEPLOYED.model_copy(update={"webhook_allow_loopback": True}),
         None),
        ("http://10.0.0.7/h", Settings(), "private"),  # loopback allowed, private not
        ("http://192.168.1.1/h", DEPLOYED, "private"),
        ("http://169.254.169.254/latest/meta-data", DEPLOYED, "private"),
        ("http://0.0.0.0/h", DEPLOYED, "private"),
        ("http://224.0.0.1/h", DEPLOYED, "private"),
        ("http://10.0.0.7/h", DEPLOYED.model_copy(update={"webhook_allow_private": True}), None),
        ("http://127.0.0.1/h", DEPLOYED.model_copy(update={"webhook_allow_private": True}), None),
        ("https://93.184.215.14/h", DEPLOYED, None),  # a public address
        ("http://no-such-host.invalid/h", DEPLOYED, "does not resolve"),
    ],
)  # fmt: skip
def test_where_a_webhook_may_point(url: str, settings: Settings, refused: str | None) -> None:
    reason = engine.url_refusal(url, settings)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_a_refused_url_is_an_error_naming_webhook() -> None:
    params = JobCreate(condition="psoriasis", webhook="http://10.0.0.7/hook")
    with pytest.raises(InvalidField) as raised:
        engine.subscription(settings=DEPLOYED, params=params)
    assert raised.value.field == "webhook"
    ok = JobCreate(
        condition="psoriasis", webhook="http://127.0.0.1:1/h", webhook_events=["completed"]
    )
    assert engine.subscription(settings=Settings(), params=ok) == {
        "webhook": "http://127.0.0.1:1/h",
        "webhook_events": ["completed"],
    }
    assert engine.subscription(settings=DEPLOYED, params=JobCreate(condition="psoriasis")) == {}


def test_backoff_doubles_up_to_its_limit() -> None:
    settings = Settings(webhook_backoff_s=5, webhook_max_backoff_s=60)
    assert [backoff_s(settings, n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


# --- events of a job's life ---------------------------------------------------------------


@pytest.fixture
def settings(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    db = make_engine(database_url)
    Base.metadata.create_all(db)
    db.dispose()
    # the embedded broker in tmp_path: what is sent after a commit can be counted
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    monkeypatch.setattr(webhooks, "get_settings", lambda: settings)  # finish_chunk's
    yield settings


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    with session_factory(settings.database_url)() as session:
        session.add(ApiKey(id="me", name="me", prefix="me", key_hash="me"))
        session.commit()
        yield session


def new_job(session: Session, events: list[str] | None, count: int = 20) -> Job:
    owner = session.get(ApiKey, "me")
    assert owner is not None
    job = engine.insert_job(session=session, owner=owner, kind="generate", count=count,
                            chunk_size=8, params={}, webhook="http://127.0.0.1:9/h",
                            webhook_events=events)  # fmt: skip
    session.commit()
    return job


def events_of(session: Session, job: Job) -> list[str]:
    rows = session.scalars(
        select(WebhookDelivery.event)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at)
    )
    return list(rows)


def run_chunk(session: Session, settings: Settings, job: Job, index: int, done: int) -> None:
    claim = engine.claim_chunk(session=session, settings=settings, job_id=job.id, index=index,
                               worker="w")  # fmt: skip
    assert claim is not None
    engine.finish_chunk(session=session, job_id=job.id, index=index, status="succeeded", done=done)


def test_a_jobs_life_writes_each_event_once_and_sends_after_commit(
    session: Session, settings: Settings
) -> None:
    job = new_job(session, ["started", "progress", "completed"])
    run_chunk(session, settings, job, 0, 8)
    assert events_of(session, job) == ["job.started", "job.progress"]
    assert queue_depth(settings, WEBHOOK_QUEUE) == 2
    run_chunk(session, settings, job, 1, 8)  # progress again within 10 s: throttled
    assert events_of(session, job) == ["job.started", "job.progress"]
    run_chunk(session, settings, job, 2, 4)  # the end is sent whatever the throttle says
    assert events_of(session, job) == ["job.started", "job.progress", "job.completed"]
    assert queue_depth(settings, WEBHOOK_QUEUE) == 3
    row = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.event == "job.completed")
    ).one()
    assert (row.status, row.attempts, row.owner_id) == ("pending", 0, "me")
    assert '"status":"succeeded"' in row.payload and '"done":20' in row.payload
    # nothing new to say: no new row
    assert engine.emit_job_events(session=session, job_id=job.id, settings=settings) == 0


def test_progress_is_sent_again_after_the_interval(session: Session, settings: Settings) -> None:
    quick = settings.model_copy(update={"webhook_progress_interval_s": 0.0})
    job = new_job(session, ["progress"])
    for index, done in ((0, 8), (1, 8)):
        engine.claim_chunk(session=session, settings=quick, job_id=job.id, index=index, worker="w")
        engine.finish_chunk(session=session, job_id=job.id, index=index, status="succeeded",
                            done=done)  # fmt: skip
    assert events_of(session, job) == ["job.progress"]  # finish_chunk's settings: 10 s
    session.execute(text("UPDATE jobs SET done = 16 WHERE id = :j"), {"j": job.id})
    assert engine.emit_job_events(session=session, job_id=job.id, settings=quick) == 1
    session.commit()
    assert events_of(session, job) == ["job.progress", "job.progress"]


def test_only_the_subscribed_events_and_nothing_on_rollback(
    session: Session, settings: Settings
) -> None:
    job = new_job(session, ["completed"], count=5)
    engine.claim_chunk(session=session, settings=settings, job_id=job.id, index=0, worker="w")
    assert events_of(session, job) == []
    session.execute(text("UPDATE jobs SET status = 'failed' WHERE id = :j"), {"j": job.id})
    assert engine.emit_job_events(session=session, job_id=job.id, settings=settings) == 1
    session.rollback()  # the row goes, and its task is never sent
    assert events_of(session, job) == []
    assert queue_depth(settings, WEBHOOK_QUEUE) == 0
    engine.finish_chunk(session=session, job_id=job.id, index=0, status="failed", done=0,
                        error="boom")  # fmt: skip
    assert events_of(session, job) == ["job.completed"]
    assert queue_depth(settings, WEBHOOK_QUEUE) == 1


def test_a_job_without_a_webhook_writes_nothing(session: Session, settings: Settings) -> None:
    owner = session.get(ApiKey, "me")
    assert owner is not None
    job = engine.insert_job(session=session, owner=owner, kind="generate", count=8,
                            chunk_size=8, params={})  # fmt: skip
    session.commit()
    run_chunk(session, settings, job, 0, 8)
    assert session.scalar(select(Job.status).where(Job.id == job.id)) == "succeeded"
    assert events_of(session, job) == []


# --- the migration ------------------------------------------------------------------------


def alembic_config(database_url: str) -> Config:
    """The configuration app.cli.upgrade_database uses."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def test_the_migration_gives_every_existing_key_its_own_secret(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0007")
    db = make_engine(database_url)
    try:
        with db.begin() as conn:
            for key in ("k1", "k2"):
                conn.execute(
                    text("INSERT INTO api_keys (id, name, prefix, key_hash, created_at) "
                         "VALUES (:k, :k, :k, :k, '2026-12-01 00:00:00')"), {"k": key},
                )  # fmt: skip
        command.upgrade(config, "0008")
        with db.connect() as conn:
            secrets = dict(conn.execute(text("SELECT id, webhook_secret FROM api_keys")).all())
        assert set(secrets) == {"k1", "k2"} and len(set(secrets.values())) == 2
        for secret in secrets.values():
            assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
        command.downgrade(config, "0007")
        with db.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one() == 2
    finally:
        db.dispose()


# --- attempts -----------------------------------------------------------------------------


@pytest.fixture
def answering() -> Iterator[tuple[str, list[int]]]:
    """A receiver on 127.0.0.1 answering the statuses put in its list, in turn."""
    codes: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(codes.pop(0))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/h", codes
    server.shutdown()
    server.server_close()


def test_what_is_retried_and_what_is_final(answering: tuple[str, list[int]]) -> None:
    url, codes = answering
    settings = Settings(webhook_timeout_s=2)
    attempt = Attempt("d1", url, '{"type":"job.completed"}', "whsec_" + "A" * 32, 1)
    outcomes = {}
    for code in (200, 204, 429, 500, 503, 400, 404, 410, 302):
        codes.append(code)
        outcome = post(attempt, settings)
        outcomes[code] = (outcome.delivered, outcome.retry, outcome.response_code)
    assert outcomes == {
        200: (True, False, 200), 204: (True, False, 204),
        429: (False, True, 429), 500: (False, True, 500), 503: (False, True, 503),
        400: (False, False, 400), 404: (False, False, 404), 410: (False, False, 410),
        302: (False, False, 302),  # redirects are not followed
    }  # fmt: skip
    with socket.socket() as sock:  # a port nobody listens on: a connection error, retried
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/h"
    refused = post(Attempt("d1", closed, "{}", attempt.secret, 1), settings)
    assert (refused.delivered, refused.retry, refused.response_code) == (False, True, None)
    # checked again at delivery time: a URL the settings no longer allow is not called
    private = post(Attempt("d1", "http://10.0.0.7/h", "{}", attempt.secret, 1), DEPLOYED)
    assert not private.retry and private.response_code is None
    assert private.error is not None and private.error.startswith("refused:")
    loopback = post(attempt, DEPLOYED)
    assert loopback.error is not None and "loopback" in loopback.error


def test_an_attempt_is_claimed_once_and_retried_until_the_limit(
    session: Session, settings: Settings
) -> None:
    limited = settings.model_copy(update={"webhook_max_attempts": 2, "webhook_backoff_s": 30})
    job = new_job(session, ["completed"], count=5)
    session.execute(text("UPDATE jobs SET status = 'canceled' WHERE id = :j"), {"j": job.id})
    engine.emit_job_events(session=session, job_id=job.id, settings=settings)
    session.commit()
    delivery_id = session.scalars(select(WebhookDelivery.id)).one()

    first = claim_attempt(session=session, settings=limited, delivery_id=delivery_id)
    assert first is not None and first.number == 1
    # a duplicate message while it runs: nothing to do (the attempt is leased)
    assert claim_attempt(session=session, settings=limited, delivery_id=delivery_id) is None
    wait = record_outcome(session=session, settings=limited, attempt=first,
                          outcome=Outcome(False, True, 503, "answered 503"))  # fmt: skip
    assert wait == 30
    # not due for 30 s: an early message does nothing
    assert claim_attempt(session=session, settings=limited, delivery_id=delivery_id) is None
    session.execute(text("UPDATE webhook_deliveries SET next_attempt_at = created_at"))
    session.commit()
    second = claim_attempt(session=session, settings=limited, delivery_id=delivery_id)
    assert second is not None and second.number == 2
    wait = record_outcome(session=session, settings=limited, attempt=second,
                          outcome=Outcome(False, True, None, "no answer"))  # fmt: skip
    assert wait is None  # the last attempt
    row = session.get(WebhookDelivery, delivery_id)
    assert row is not None
    session.refresh(row)
    assert (row.status, row.attempts, row.error) == ("failed", 2, "no answer")
    assert claim_attempt(session=session, settings=limited, delivery_id=delivery_id) is None


def test_a_delivery_whose_message_was_lost_is_sent_again(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    job = new_job(session, ["completed"], count=5)
    session.execute(text("UPDATE jobs SET status = 'failed' WHERE id = :j"), {"j": job.id})
    engine.emit_job_events(session=session, job_id=job.id, settings=settings)
    session.commit()
    # a broker that lost the message (an empty one): nothing overdue yet, then overdue
    empty = settings.model_copy(update={
        "broker_url": f"sqlitewal+sqlite:///{(tmp_path / 'emptied.sqlite').as_posix()}",
        "webhook_redeliver_after_s": 60.0})  # fmt: skip
    assert engine.resend_lost_deliveries(empty) == 0
    overdue = datetime.now(UTC) - timedelta(seconds=120)  # through the column's type
    session.execute(update(WebhookDelivery).values(next_attempt_at=overdue))
    session.commit()
    assert engine.resend_lost_deliveries(settings) == 0  # its message still waits: no copy
    assert engine.resend_lost_deliveries(empty) == 1
    assert queue_depth(empty, WEBHOOK_QUEUE) == 1
    assert engine.resend_lost_deliveries(empty) == 0  # sent again once, not on every pass
