"""The broker side of the service: the embedded SQLite transport and task dispatch.

The broker only delivers; the database holds job state. The API sends tasks by name so it
never imports workers/ (nor torch). The embedded transport is kombu's SQLAlchemy transport on
its own SQLite file in WAL mode (kombu's filesystem transport loses messages under concurrent
producers, kombu issue #1551).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from json import loads
from queue import Empty
from typing import Any

import kombu.transport
from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqla
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, delete, event, select, text, true

from app.config import Settings
from app.db.session import SQLITE_BUSY_TIMEOUT_MS, _sqlite_pragmas

log = logging.getLogger(__name__)

GENERATE_TASK = "synthderm.generate_chunk"
INGEST_TASK = "synthderm.ingest_dataset"
EXPORT_TASK = "synthderm.export_dataset"
TRAIN_TASK = "synthderm.train_run"
FINETUNE_TASK = "synthderm.finetune_member"
EVALUATE_TASK = "synthderm.evaluate_dataset"
GPU_QUEUE = "gpu"
# CPU work (ingest, export, classifier training, evaluations) goes to the `train` queue's workers.
TRAIN_QUEUE = "train"
# job kind -> (task name, queue)
JOB_TASKS = {
    "generate": (GENERATE_TASK, GPU_QUEUE),
    "ingest": (INGEST_TASK, TRAIN_QUEUE),
    "export": (EXPORT_TASK, TRAIN_QUEUE),
    "experiment": (TRAIN_TASK, TRAIN_QUEUE),
    "finetune": (FINETUNE_TASK, GPU_QUEUE),
    "evaluation": (EVALUATE_TASK, TRAIN_QUEUE),
}
# Webhook deliveries have a queue of their own, so a job's last event never waits behind a
# generation chunk (`synthderm run` and compose start a small worker for it).
WEBHOOK_TASK = "synthderm.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"


# The id of a delivered message's row, carried in its properties until it is acked.
ROW_ID = "x_broker_row_id"
# PRAGMA user_version of a broker file cleaned and indexed by this module.
BROKER_SCHEMA_VERSION = 1
# Free pages are given back to the file system when a poll finds a queue empty, at most this often.
VACUUM_EVERY_S = 10.0
VACUUM_MIN_FREE_PAGES = 64
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
_PREPARED: set[str] = set()


def _broker_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # only takes effect on a new file (before its first table); an older file needs a VACUUM
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    cursor.close()
    _sqlite_pragmas(dbapi_connection, record)


class _DeleteOnAckQoS(virtual.QoS):
    """Deletes a message's row when it is acked (or rejected without requeue), never before."""

    def ack(self, delivery_tag: str) -> None:
        message = self._delivered.get(delivery_tag)
        super().ack(delivery_tag)
        if message is not None:
            self.channel._delete_delivered(message)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._delivered.get(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # a requeue goes through _restore
        if message is not None and not requeue:
            self.channel._delete_delivered(message)


class _SQLiteWALChannel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel, but a delivered message is deleted on ack.

    kombu marks a fetched row invisible and keeps it forever, and its poll scans them all.
    Here: the fetch still only hides the row (a worker that dies before acking loses nothing
    that kombu would have kept: a restore re-puts the message and deletes the hidden row); the
    ack deletes it; the poll is one index search (`ix_<table>_poll`), without a write lock
    when the queue is empty; free pages go back to the file system when idle.
    """

    QoS = _DeleteOnAckQoS

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        self._queue_ids: dict[str, int] = {}
        self._next_vacuum = 0.0
        super().__init__(connection, **kwargs)

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        engine = create_engine(
            conninfo.hostname,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _broker_pragmas)
        return engine

    def _open(self) -> Any:
        engine, session_maker = super()._open()
        hostname = self.connection.client.hostname
        if hostname not in _PREPARED:
            with kombu_sqla._MUTEX:
                if hostname not in _PREPARED:
                    prepare_broker_file(engine, self.message_cls.__table__)
                    _PREPARED.add(hostname)
        return engine, session_maker

    def _queue_id(self, queue: str) -> int:
        queue_id = self._queue_ids.get(queue)
        if queue_id is None:
            queue_id = self._queue_ids[queue] = int(self._get_or_create(queue).id)
        return queue_id

    def _poll_query(self, queue_id: int) -> Any:
        message = self.message_cls
        return (
            select(message.id)
            .where(message.queue_id == queue_id, message.visible == true())
            .order_by(message.sent_at, message.id)
            .limit(1)
        )

    def _get(self, queue: str, timeout: Any = None) -> Any:
        queue_id = self._queue_id(queue)
        session = self.session
        # an empty poll is one read through the index, without taking the write lock
        try:
            waiting = session.execute(self._poll_query(queue_id)).first()
        finally:
            session.commit()
        if waiting is None:
            self._vacuum_when_idle()
            raise Empty()
        session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            row_id = session.execute(self._poll_query(queue_id)).scalar()
            if row_id is None:  # taken by another consumer in between
                raise Empty()
            msg = session.get(self.message_cls, row_id)
            msg.visible = False
            payload: dict[str, Any] = loads(bytes_to_str(msg.payload))
            payload["properties"][ROW_ID] = row_id
            return payload
        finally:
            session.commit()

    def _restore(self, message: Any) -> None:
        row_id = message.properties.pop(ROW_ID, None)
        super()._restore(message)  # puts the message back as a new row, then
        if row_id is not None:  # the hidden one goes (at least once: never the other order)
            self._delete_rows([row_id])

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self._delete_delivered(message)
        return message

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        if no_ack:  # nothing will ack: the row goes at delivery
            plain = callback

            def callback(message: Any) -> Any:
                self._delete_delivered(message)
                return plain(message)

        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def _delete_delivered(self, message: Any) -> None:
        row_id = message.properties.get(ROW_ID)
        if row_id is not None:
            self._delete_rows([row_id])

    def _delete_rows(self, row_ids: list[int]) -> None:
        # its own connection: acks may come from another thread than the consuming one
        table = self.message_cls.__table__
        engine, _ = self._open()
        try:
            with engine.begin() as connection:
                connection.execute(delete(table).where(table.c.id.in_(row_ids)))
        except Exception:  # the task is done; a hidden row left behind goes at the next start
            log.warning("could not delete delivered broker rows %s", row_ids, exc_info=True)

    def _vacuum_when_idle(self) -> None:
        now = time.monotonic()
        if now < self._next_vacuum:
            return
        self._next_vacuum = now + VACUUM_EVERY_S
        engine, _ = self._open()
        try:
            reclaim_free_pages(engine)
        except Exception:  # busy: next time
            log.debug("broker incremental vacuum skipped", exc_info=True)


def _drain(result: Any) -> None:
    """Run a pragma to its end: read its rows when it has any (incremental_vacuum may answer
    with none, and then the result is already closed)."""
    if result.returns_rows:
        result.fetchall()
    result.close()


def reclaim_free_pages(engine: Any, min_free_pages: int = VACUUM_MIN_FREE_PAGES) -> int:
    """Give the broker file's free pages back (incremental auto_vacuum); pages freed."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        free = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
        if free < min_free_pages:
            return 0
        _drain(connection.exec_driver_sql("PRAGMA incremental_vacuum"))
        _drain(connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)"))
        return free


def prepare_broker_file(engine: Any, table: Any) -> None:
    """Index the poll; on a file from an earlier version, delete the rows kombu kept as
    delivered (invisible) and switch it to incremental auto_vacuum (one VACUUM)."""
    name = table.name
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        sql = connection.exec_driver_sql
        sql(
            f'CREATE INDEX IF NOT EXISTS "ix_{name}_poll"'
            f' ON "{name}" (queue_id, visible, timestamp, id)'
        )
        if int(sql("PRAGMA user_version").scalar() or 0) < BROKER_SCHEMA_VERSION:
            deleted = sql(f'DELETE FROM "{name}" WHERE visible = 0').rowcount
            if deleted:
                log.info("broker: deleted %d delivered messages kept by kombu", deleted)
        if int(sql("PRAGMA auto_vacuum").scalar() or 0) != 2:
            sql("PRAGMA auto_vacuum=INCREMENTAL")
            sql("VACUUM")
        elif int(sql("PRAGMA freelist_count").scalar() or 0):
            _drain(sql("PRAGMA incremental_vacuum"))
        sql(f"PRAGMA user_version={BROKER_SCHEMA_VERSION}")


class SQLiteWALTransport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport on a SQLite file in WAL mode with a busy timeout, whose
    acked messages are deleted and whose file gives its free pages back."""

    Channel = _SQLiteWALChannel


kombu.transport.TRANSPORT_ALIASES["sqlitewal"] = "app.broker:SQLiteWALTransport"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API's producer and the workers."""
    transport_options: dict[str, Any] = {}
    if settings.broker_is_embedded:
        path = settings.broker_url.split("///", 1)[-1]
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        transport_options["polling_interval"] = settings.broker_polling_interval_s
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": GPU_QUEUE,
        "task_routes": {
            **{task: {"queue": queue} for task, queue in JOB_TASKS.values()},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_heartbeat": 0,
    }


@lru_cache(maxsize=4)
def _producer(broker_url: str, settings_json: str) -> Celery:
    settings = Settings.model_validate_json(settings_json)
    app = Celery("synthderm-producer")
    app.conf.update(celery_config(settings))
    return app


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (one per settings per process)."""
    return _producer(settings.broker_url, settings.model_dump_json())


def send_chunk(settings: Settings, *, kind: str, job_id: str, chunk_index: int) -> None:
    """Enqueue one chunk of a job on its kind's queue; raises if the broker refuses."""
    task, queue = JOB_TASKS[kind]
    producer(settings).send_task(
        task,
        kwargs={"job_id": job_id, "chunk_index": chunk_index},
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


def send_delivery(settings: Settings, *, delivery_id: str, countdown: float | None = None) -> None:
    """Enqueue one webhook delivery's attempt (after `countdown` seconds); raises if the broker
    refuses."""
    producer(settings).send_task(
        WEBHOOK_TASK,
        kwargs={"delivery_id": delivery_id},
        queue=WEBHOOK_QUEUE,
        countdown=countdown,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


def queue_depth(settings: Settings, queue: str) -> int:
    """Messages waiting (not yet delivered) in `queue`."""
    app = producer(settings)
    with app.connection_for_write() as connection, connection.channel() as channel:
        try:
            _name, count, _consumers = channel.queue_declare(queue=queue, passive=True)
        except Exception:  # the queue does not exist yet: nothing waits in it
            return 0
        return int(count)


def check_broker(settings: Settings) -> None:
    """Raise unless the broker accepts a connection."""
    app = producer(settings)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        if settings.broker_is_embedded:
            with connection.channel() as channel:
                channel.queue_declare(queue=GPU_QUEUE, durable=True)
